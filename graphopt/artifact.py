"""Artifact folders: the manifest describing a compiled model's I/O, and safe, atomic saving.

A build happens in a private temporary folder (mode 0700); `publish` copies it to the user's path:
- a destination that does not exist, or is an empty folder, receives the artifact;
- an existing graphopt artifact (a folder with graphopt's ``manifest.json``) is replaced, with
  ``overwrite=True`` (the default) — and only if it holds nothing but the files graphopt wrote;
- anything else (a non-empty folder that is not an artifact, a file, an artifact holding files of
  the user's, or any artifact with ``overwrite=False``) is refused with `ArtifactError` before
  anything is touched.
The copy is staged in ``.NAME.partial-PID-*`` beside the destination and swapped in with one
atomic ``renameat2(RENAME_EXCHANGE)`` (file systems without it: two renames, undone by the next
save if a crash falls between them), so the destination always holds the old artifact or the
complete new one. Saves into one parent folder are serialised by a lock on that folder; each save
first removes the staging folders of dead processes. Saved artifacts get the user's umask.

The manifest records every file's SHA-256 and its own digest; `verify_integrity` refuses an
artifact whose files or manifest changed after graphopt wrote them.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from graphopt.errors import ArtifactError

MANIFEST = "manifest.json"
GENERATOR = "graphopt"
# report.* describe the build and may be regenerated; they are listed but not integrity-checked
_UNCHECKED = frozenset({"report.json", "report.md"})
_LEGACY_KEYS = frozenset({"target", "runtime", "inputs", "outputs"})  # manifests written before "generator"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy-style name: float32, int8, ...

    @staticmethod
    def of(name: str, t: torch.Tensor) -> TensorSpec:
        return TensorSpec(name, tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @staticmethod
    def from_dict(d: dict) -> TensorSpec:
        return TensorSpec(d["name"], tuple(d["shape"]), d["dtype"])


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps({"generator": GENERATOR, **manifest}, indent=2, sort_keys=True))


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder} is not a graphopt artifact (no readable {MANIFEST}): {exc}") from exc
    if not _is_graphopt_manifest(manifest):
        raise ArtifactError(f"{folder}/{MANIFEST} was not written by graphopt; pass the folder that "
                            "CompiledModel.save or `graphopt compile --out` wrote.")
    return manifest


def _is_graphopt_manifest(manifest) -> bool:
    return isinstance(manifest, dict) and (manifest.get("generator") == GENERATOR or _LEGACY_KEYS <= manifest.keys())


def _manifest_if_artifact(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if _is_graphopt_manifest(manifest) else None


# ---- integrity ------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _seal(folder: Path) -> None:
    """Record every file's hash in the manifest of the (staged) artifact ``folder``, then its digest."""
    manifest = read_manifest(folder)
    manifest["artifact_files"] = {p.relative_to(folder).as_posix(): file_sha256(p)
                                  for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest["integrity"] = _digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def verify_integrity(folder: Path, manifest: dict) -> None:
    """Refuse a saved artifact whose manifest or files changed after graphopt wrote them (unsealed
    build folders and artifacts saved before sealing existed are not checked)."""
    if "integrity" not in manifest:
        return
    if _digest(manifest) != manifest["integrity"]:
        raise ArtifactError(f"{folder}/{MANIFEST} was edited after graphopt wrote it, so it may not describe the "
                            "library any more. Recompile the model (or restore the saved folder).")
    for rel, want in manifest.get("artifact_files", {}).items():
        if rel in _UNCHECKED:
            continue
        path = folder / rel
        if not path.is_file():
            raise ArtifactError(f"artifact {folder} is incomplete: {rel} is missing. Recompile the model or "
                                "restore the saved folder.")
        if file_sha256(path) != want:
            raise ArtifactError(f"artifact {folder}: {rel} changed after graphopt wrote it and no longer matches "
                                f"{MANIFEST}. Recompile the model (or restore the saved folder).")


# ---- destination checks ---------------------------------------------------------------------------

def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_destination(path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Refuse, before any compile work, a destination that `publish` would refuse or cannot write.

    Writability is probed by creating and removing a folder next to ``path`` — permission bits
    alone say nothing for root or for read-only and pseudo file systems.
    """
    path = Path(path).expanduser().absolute()
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ArtifactError(f"output path {path} exists and is not a folder; choose a new folder path. "
                            "Nothing was written.")
    if path.is_dir():
        _check_replaceable(path, overwrite)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"output path {path} is inside {parent}, which is a file, not a folder. "
                            "Nothing was written.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".graphopt-probe-", dir=parent))
    except OSError as exc:
        raise ArtifactError(f"output path {path} is not writable ({exc.strerror} in {parent}); choose another "
                            "folder or fix its permissions. Nothing was written.") from exc
    return path


def _check_replaceable(path: Path, overwrite: bool) -> None:
    entries = [p.name for p in path.iterdir()]
    if not entries:
        return
    manifest = _manifest_if_artifact(path)
    if manifest is None:
        raise ArtifactError(f"output folder {path} is not a graphopt artifact and is not empty (it holds "
                            f"{_listing(entries)}); graphopt replaces only its own artifacts. Save to a new or empty "
                            f"folder, e.g. {path / 'model'}. Nothing was written.")
    if not overwrite:
        raise ArtifactError(f"output folder {path} already holds a graphopt artifact; pass overwrite=True (CLI: "
                            "--overwrite) to replace it, or choose another folder. Nothing was written.")
    listed = manifest.get("artifact_files")
    if listed is None:  # saved before file lists existed: everything in it is graphopt's
        return
    files = {MANIFEST} | set(listed)
    folders = {parent.as_posix() for f in files for parent in Path(f).parents}
    foreign = []
    for p in path.rglob("*"):
        rel = p.relative_to(path).as_posix()
        if rel not in (folders if p.is_dir() and not p.is_symlink() else files):
            foreign.append(rel)
    if foreign:
        raise ArtifactError(f"output folder {path} is a graphopt artifact but also holds files graphopt did not "
                            f"write ({_listing(foreign)}); move them out or save elsewhere. Nothing was written.")


# ---- publishing -----------------------------------------------------------------------------------

def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def _locked(folder: Path):
    """Serialise saves into ``folder`` across processes (flock on the folder itself: no lock file)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _recover(dst: Path) -> None:
    """Undo what a killed save to ``dst`` left: put back an artifact moved aside between two renames,
    remove staging folders of dead processes. Only graphopt's own names, of dead PIDs, are touched."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(partial|old)-(\d+)-[A-Za-z0-9_]+")
    for entry in sorted(dst.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink() or pid_alive(int(m[2])):
            continue
        if m[1] == "old" and not dst.exists():
            os.rename(entry, dst)
        else:
            shutil.rmtree(entry, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(src: Path, dst: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Copy the build folder ``src`` to ``dst`` as described in the module docstring; returns ``dst``."""
    dst = check_destination(dst, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    try:
        with _locked(dst.parent):
            _recover(dst)
            if dst.is_dir():
                _check_replaceable(dst, overwrite)  # again, under the lock
            staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
            shutil.copytree(src, staging, dirs_exist_ok=True, symlinks=True)
            mode = 0o777 & ~_umask()
            for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir() and not p.is_symlink())]:
                os.chmod(folder, mode)
            _seal(staging)
            if not dst.exists():
                os.rename(staging, dst)
            elif _exchange(staging, dst):  # staging now holds the old artifact
                shutil.rmtree(staging, ignore_errors=True)
            else:
                old = staging.with_name(staging.name.replace(".partial-", ".old-", 1))
                os.rename(dst, old)
                try:
                    os.rename(staging, dst)  # a crash between the renames is undone by the next save's _recover
                except OSError:
                    os.rename(old, dst)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            staging = None
    except OSError as exc:
        raise ArtifactError(f"could not write the artifact to {dst}: {exc}. The folder holds what it held "
                            "before.") from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return dst
