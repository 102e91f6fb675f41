"""Artifact folders: the manifest describing a compiled model's I/O, and atomic saving.

A build happens in a private temporary folder; `atomic_copy_tree` publishes it to the user's
path in one rename, so a failure never leaves a partial artifact behind, and an existing
artifact at that path is replaced only once the new one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from graphopt.errors import ArtifactError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy-style name: float32, int8, ...

    @staticmethod
    def of(name: str, t: torch.Tensor) -> "TensorSpec":
        return TensorSpec(name, tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @staticmethod
    def from_dict(d: dict) -> "TensorSpec":
        return TensorSpec(d["name"], tuple(d["shape"]), d["dtype"])


def check_writable(path: Path) -> Path:
    """Fail early (before any compile work) if ``path`` cannot be created or replaced.

    Probes by creating and removing a temporary folder next to ``path`` — permission bits alone
    say nothing for root or for read-only and pseudo file systems.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"output path {path} exists and is not a folder; choose a folder path. Nothing was written.")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"output path {path} is inside {parent}, which is a file, not a folder. Nothing was written.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".graphopt-probe-", dir=parent))
    except OSError as exc:
        raise ArtifactError(f"output path {path} is not writable ({exc.strerror} in {parent}); choose another "
                            "folder or fix its permissions. Nothing was written.") from exc
    return path


def atomic_copy_tree(src: Path, dst: Path) -> Path:
    """Copy folder ``src`` to ``dst`` so that ``dst`` is either the old content or the complete new one."""
    dst = check_writable(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        shutil.copytree(src, staging, dirs_exist_ok=True, symlinks=True)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            os.rename(staging, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dst)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ArtifactError(f"could not write the artifact to {dst}: {exc}. Nothing was written.") from exc
    return dst


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder} is not a graphopt artifact (no readable {MANIFEST}): {exc}") from exc
