"""Content-addressed build cache: an unchanged model "rebuilds" by copying its artifact.

`graphopt.compile` consults the cache once the passes and legalization ran: the rewritten fx graph
and the example inputs' shapes determine everything after (export, lowering, build). The key is a
SHA-256 of:
- the graph: the code of it and its graph submodules, the ``torch.nn`` leaf modules it calls
  (class, settings), every parameter, buffer and tensor attribute byte for byte — a graph that calls
  a function or module of the user's (whose body its code does not show) is not cached;
- the artifact's inputs and outputs (names, shapes, dtypes), the target spec, the build options
  (symbol name, ``optimize_for``, the tuning database's files);
- the software that builds: graphopt (a digest of its installed source files, not just its
  version), torch, apache-tvm, apache-tvm-ffi, and the C compilers it may call (path, size, mtime).
A hit copies the entry into a fresh build folder and restores the lowering report; nothing is
exported again, lowered or compiled. Verification and instruction counting still run on the copy.

Where: ``$GRAPHOPT_BUILD_CACHE`` when set (a folder; ``off`` disables the cache), else
``$GRAPHOPT_HOME/builds`` (``~/.cache/graphopt/builds``). Bounded: after each store the least
recently used entries are removed until the entries total at most ``$GRAPHOPT_BUILD_CACHE_MB``
megabytes (default 2048; the entry just stored is kept even if it alone is larger).

Safe under concurrent builds and kill -9: an entry is written into ``.staging-PID-*`` inside the
cache and renamed into place in one step, so readers see a whole entry or none; the first of two
concurrent stores of one key wins and the other's copy is dropped; staging folders of dead
processes are removed by the next store. Eviction renames an entry away (``.evict-PID-*``) before
deleting it. A hit checks every file's SHA-256: an entry that fails (disk damage, a hand edit) is
removed and the model is built afresh. The cache removes only folders it named itself, and a cache
that cannot be written costs a warning in the report, never the compile.

Refuses (`ConfigError`): ``$GRAPHOPT_BUILD_CACHE_MB`` that is not a positive integer.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from graphopt.artifact import file_sha256, pid_alive
from graphopt.errors import ConfigError

FORMAT = 1  # bump when an entry's layout changes: old entries then never match
_META = "entry.json"
_DEFAULT_MB = 2048
_OWN = re.compile(r"\.(staging|evict)-(\d+)-[A-Za-z0-9_]+")
_KEY = re.compile(r"[0-9a-f]{64}")
_COMPILERS = ("gcc", "g++", "aarch64-linux-gnu-gcc", "arm-linux-gnueabihf-gcc", "arm-none-eabi-gcc")
_SOURCE_SUFFIXES = (".py", ".c", ".cc", ".h")


@functools.cache
def _software() -> dict:
    """What builds an artifact, beyond the graph: versions and a digest of graphopt's own source files."""
    h = hashlib.sha256()
    for pkg in ("graphopt", "graphopt.passes", "graphopt.targets"):
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.origin is not None, pkg
        root = Path(spec.origin).parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES and "__pycache__" not in p.parts):
            h.update(f"{pkg}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
    versions: dict[str, str | None] = {}
    for dist in ("graphopt", "torch", "apache-tvm", "apache-tvm-ffi"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"graphopt_source": h.hexdigest(), "versions": versions, "format": FORMAT}


def _compilers() -> dict:
    """The C compilers a build may call, by resolved path, size and mtime (an upgrade changes the key)."""
    found = {}
    for name in _COMPILERS:
        path = shutil.which(name)
        if path:
            real = os.path.realpath(path)
            st = os.stat(real)
            found[name] = [real, st.st_size, st.st_mtime_ns]
    return found


def _update_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _attr(module: torch.nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _trusted_function(fn) -> bool:
    """A call_function target whose meaning the graph's code pins down: a torch op or a builtin."""
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return True
    module = getattr(fn, "__module__", None) or ""
    return module in ("_operator", "operator", "builtins", "math") or module.split(".")[0] == "torch"


def graph_digest(gm: torch.fx.GraphModule) -> str | None:
    """SHA-256 of what export and lowering read from ``gm``: the code of it and of its graph submodules,
    the ``torch.nn`` leaf modules it calls (class, settings), every tensor it holds. None when it calls
    or holds something else (a user's leaf module or function, a non-tensor attribute): not cached."""
    h = hashlib.sha256()
    tensors = dict(gm.state_dict())
    for name, module in gm.named_modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        h.update(f"graph {name}\0{module.code}\0".encode())
        for node in module.graph.nodes:
            if node.op == "get_attr":
                value = _attr(module, node.target)
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}.{node.target}"] = value
                elif not isinstance(value, torch.fx.GraphModule):
                    return None
            elif node.op == "call_module":
                leaf = module.get_submodule(node.target)
                if isinstance(leaf, torch.fx.GraphModule):
                    continue
                cls = type(leaf)
                if not cls.__module__.startswith("torch.nn."):
                    return None
                h.update(f"leaf {name}.{node.target}\0{cls.__module__}.{cls.__qualname__}\0{leaf.extra_repr()}"
                         f"\0{leaf.training}\0".encode())
            elif node.op == "call_function" and not _trusted_function(node.target):
                return None
    for key in sorted(tensors):
        _update_tensor(h, key, tensors[key])
    return h.hexdigest()


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f"{path.relative_to(folder).as_posix()}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _files(folder: Path) -> dict[str, list]:
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, file_sha256(p)]
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class BuildCache:
    """A cache folder and its size bound; `from_environment` gives the configured one (or None)."""

    folder: Path
    max_bytes: int = _DEFAULT_MB << 20

    @staticmethod
    def from_environment() -> BuildCache | None:
        where = os.environ.get("GRAPHOPT_BUILD_CACHE", "")
        if where.strip().lower() == "off":
            return None
        mb = os.environ.get("GRAPHOPT_BUILD_CACHE_MB", str(_DEFAULT_MB))
        if not mb.isdigit() or int(mb) <= 0:
            raise ConfigError(f"GRAPHOPT_BUILD_CACHE_MB={mb!r} must be a positive whole number of megabytes "
                              f"(default {_DEFAULT_MB}); set GRAPHOPT_BUILD_CACHE=off to disable the build cache")
        if where:
            folder = Path(where).expanduser()
        else:
            from graphopt.targets.backends.toolchain import graphopt_home

            folder = graphopt_home() / "builds"
        return BuildCache(folder, int(mb) << 20)

    def key(self, gm: torch.fx.GraphModule, spec_dict: dict, options: dict,
            database: Path | None = None) -> str | None:
        """The entry's key, or None when ``gm`` cannot be hashed faithfully (then nothing is cached)."""
        program = graph_digest(gm)
        if program is None:
            return None
        body = {"program": program, "target": spec_dict, "options": options, "software": _software(),
                "compilers": _compilers(),
                "database": _folder_digest(database) if database is not None else None}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    def fetch(self, key: str, dest: Path) -> dict | None:
        """Copy entry ``key``'s files into the empty folder ``dest`` and return its stored metadata;
        None on a miss (``dest`` is left empty). A damaged entry is removed and counts as a miss."""
        entry = self.folder / key
        try:
            meta = json.loads((entry / _META).read_text())
            files = meta["files"]
            for rel, (size, digest) in files.items():
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(entry / "files" / rel, target)
                if target.stat().st_size != size or file_sha256(target) != digest:
                    raise ValueError(f"{rel} does not match its recorded SHA-256")
            os.utime(entry / _META)  # most recently used
        except FileNotFoundError:
            self._empty(dest)
            return None
        except (OSError, ValueError, KeyError, TypeError):
            self._empty(dest)
            with contextlib.suppress(OSError):
                self._discard(entry)
            return None
        return meta["data"]

    def store(self, key: str, src: Path, data: dict) -> None:
        """Add ``src``'s files under ``key`` with ``data`` (JSON-serialisable), then bound the size.
        Raises OSError when the cache folder cannot be written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._remove_debris()
        entry = self.folder / key
        if entry.exists():
            return
        stage = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=self.folder))
        try:
            shutil.copytree(src, stage / "files", symlinks=False)
            files = _files(stage / "files")
            meta = {"key": key, "created": time.time(), "bytes": sum(size for size, _ in files.values()),
                    "files": files, "data": data}
            (stage / _META).write_text(json.dumps(meta, sort_keys=True))
            try:
                os.rename(stage, entry)
            except OSError:
                if not entry.exists():
                    raise
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        self._bound(keep=key)

    def entries(self) -> list[tuple[str, int, float]]:
        """(key, bytes, last use) of every entry, least recently used first."""
        out = []
        for path in self.folder.iterdir() if self.folder.is_dir() else ():
            if not _KEY.fullmatch(path.name):
                continue
            try:
                meta_path = path / _META
                out.append((path.name, int(json.loads(meta_path.read_text())["bytes"]), meta_path.stat().st_mtime))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(out, key=lambda e: e[2])

    def _bound(self, keep: str) -> None:
        with FileLock(str(self.folder / ".lock")):
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            for key, size, _ in entries:
                if total <= self.max_bytes:
                    break
                if key != keep:
                    self._discard(self.folder / key)
                    total -= size

    def _discard(self, entry: Path) -> None:
        """Rename ``entry`` away (readers then miss it whole), then delete it."""
        if not _KEY.fullmatch(entry.name):
            return
        away = Path(tempfile.mkdtemp(prefix=f".evict-{os.getpid()}-", dir=self.folder))
        try:
            os.rename(entry, away / entry.name)
        except FileNotFoundError:
            pass
        shutil.rmtree(away, ignore_errors=True)

    def _remove_debris(self) -> None:
        """Staging and eviction folders left by processes that died (killed mid-store)."""
        for path in self.folder.iterdir():
            m = _OWN.fullmatch(path.name)
            if m and path.is_dir() and not path.is_symlink() and not pid_alive(int(m[2])):
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _empty(folder: Path) -> None:
        for path in list(folder.iterdir()):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
