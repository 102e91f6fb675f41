"""`CompiledModel`: a built artifact that can be called like the model and saved.

Host artifacts run in-process on the TVM runtime; emulated targets run their artifact under
QEMU with the target's pinned CPU. Calls are checked against the manifest: wrong count, shape
or dtype raises `InputError` before anything runs. Outputs come back as torch tensors — one
tensor if the model returned one, else a flat tuple in the model's output order.

A compile's build folder (``$TMPDIR/graphopt-build-PID-*``, mode 0700) belongs to its
`CompiledModel`: it is removed when the object is garbage-collected or the process exits; build
folders of processes that died without that are removed by the next build. `load` refuses a saved
artifact whose files or manifest changed after graphopt wrote them; calling a model whose folder
was deleted raises `ArtifactError`.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from graphopt.artifact import MANIFEST, TensorSpec, pid_alive, publish, read_manifest, verify_integrity
from graphopt.errors import ArtifactError, ConfigError, GraphoptError, InputError
from graphopt.report import Report
from graphopt.targets import TargetSpec, get_target
from graphopt.targets.backends.base import IN_MEMORY
from graphopt.targets.backends.registry import backend_for


class CompiledModel:
    def __init__(self, spec: TargetSpec, build_dir: Path, manifest: dict, report: Report | None = None,
                 *, owns_build_dir: bool = True):
        self.target = spec
        self.build_dir = Path(build_dir)
        self.manifest = manifest
        self.report = report
        self.inputs = [TensorSpec.from_dict(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_dict(d) for d in manifest["outputs"]]
        self._cache: dict = {}  # the backend's per-model state (e.g. the loaded library)
        self._expected = [(s.shape, getattr(torch, s.dtype, None)) for s in self.inputs]  # check_inputs' fast path
        if owns_build_dir:
            weakref.finalize(self, shutil.rmtree, str(self.build_dir), True)

    @classmethod
    def load(cls, folder: str | Path) -> CompiledModel:
        """Open a saved artifact folder (the target must be registered in this process)."""
        if not isinstance(folder, (str, os.PathLike)):
            raise ConfigError(f"CompiledModel.load takes the path of a saved artifact folder (str or Path), got "
                              f"{type(folder).__name__}")
        folder = Path(folder)
        manifest = read_manifest(folder)
        verify_integrity(folder, manifest)
        return cls(get_target(manifest["target"]["name"]), folder, manifest, None, owns_build_dir=False)

    def __call__(self, *inputs: torch.Tensor):
        arrays = self.check_inputs(inputs)
        if not self._cache.get(IN_MEMORY) and not (self.build_dir / MANIFEST).is_file():
            raise ArtifactError(f"the artifact folder {self.build_dir} no longer exists or lost its {MANIFEST} "
                                "(deleted after compile?). Recompile the model, or CompiledModel.load a saved copy.")
        try:
            outs = backend_for(self.target).run(self.build_dir, self.target, arrays, self.manifest, self._cache)
        except GraphoptError:
            raise
        except Exception as exc:  # the runtime's own error (e.g. a library that does not match the manifest)
            raise ArtifactError(f"running the artifact in {self.build_dir} failed: {type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}. If its files were "
                                "modified, recompile the model; otherwise please report this.") from exc
        tensors = tuple(_to_torch(np.ascontiguousarray(o)) for o in outs)
        return tensors[0] if self.manifest.get("single_output", False) else tensors

    def save(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write the artifact folder to ``path`` atomically; returns the resolved path.

        ``path`` must be new, an empty folder, or a graphopt artifact holding only graphopt's files
        (replaced in one atomic step unless ``overwrite=False``); anything else raises
        `ArtifactError` and is left untouched (see `graphopt.artifact.publish`).
        """
        if not (self.build_dir / MANIFEST).is_file():
            raise ArtifactError(f"the artifact folder {self.build_dir} no longer exists (deleted after compile?); "
                                "recompile the model. Nothing was written.")
        return publish(self.build_dir, path, overwrite=overwrite)

    def check_inputs(self, inputs) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise InputError(f"expected {len(self.inputs)} input(s) "
                             f"{[(s.name, s.shape, s.dtype) for s in self.inputs]}, got {len(inputs)}")
        arrays = []
        for t, s, (shape, dtype) in zip(inputs, self.inputs, self._expected, strict=True):
            if isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == shape and t.device.type == "cpu":
                arrays.append(_to_numpy(t))  # per call: the checks below cost ~5x
                continue
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input {s.name} must be a torch.Tensor, got {type(t).__name__}")
            got = TensorSpec.of(s.name, t)
            if got.shape != s.shape or got.dtype != s.dtype:
                raise InputError(f"input {s.name}: compiled for shape {list(s.shape)} {s.dtype}, got "
                                 f"{list(got.shape)} {got.dtype}. Recompile with matching example_inputs.")
            arrays.append(_to_numpy(t.cpu()))
        return arrays

    def __repr__(self) -> str:
        return (f"CompiledModel(target={self.target.name!r}, inputs={[s.shape for s in self.inputs]}, "
                f"outputs={[s.shape for s in self.outputs]}, folder={str(self.build_dir)!r})")


_BUILD_DIR = re.compile(r"graphopt-build-(\d+)-[A-Za-z0-9_]+")


def new_build_dir() -> Path:
    """A private build folder; first removes those left by dead processes (killed before cleanup)."""
    tmp = Path(tempfile.gettempdir())
    for entry in tmp.glob("graphopt-build-*"):
        m = _BUILD_DIR.fullmatch(entry.name)
        if (m and entry.is_dir() and not entry.is_symlink() and entry.lstat().st_uid == os.getuid()
                and not pid_alive(int(m[1]))):
            shutil.rmtree(entry, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"graphopt-build-{os.getpid()}-", dir=tmp))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """`t` as a C-contiguous array, without a copy when it already is one; bfloat16 (which torch
    cannot hand to numpy) as ml_dtypes' bfloat16, the dtype TVM reads and writes."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return np.ascontiguousarray(t.detach().view(torch.int16).numpy()).view(ml_dtypes.bfloat16)
    return np.ascontiguousarray(t.detach().numpy())


def _to_torch(a: np.ndarray) -> torch.Tensor:
    """`a` as a torch tensor sharing its memory (ml_dtypes' bfloat16 as torch.bfloat16)."""
    if a.dtype.kind == "V" and a.dtype.name == "bfloat16":  # `dtype.name` alone costs ~3 µs per call
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
