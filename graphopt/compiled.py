"""`CompiledModel`: a built artifact that can be called like the model and saved.

Host artifacts run in-process on the TVM runtime; emulated targets run their artifact under
QEMU with the target's pinned CPU. Calls are checked against the manifest: wrong count, shape
or dtype raises `InputError` before anything runs. Outputs come back as torch tensors — one
tensor if the model returned one, else a flat tuple in the model's output order.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from graphopt.artifact import TensorSpec, atomic_copy_tree, read_manifest
from graphopt.errors import InputError
from graphopt.report import Report
from graphopt.targets import TargetSpec, get_target
from graphopt.targets.backend import backend_for


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
        if owns_build_dir:
            weakref.finalize(self, shutil.rmtree, str(self.build_dir), True)

    @classmethod
    def load(cls, folder: str | Path) -> "CompiledModel":
        """Open a saved artifact folder (the target must be registered in this process)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        return cls(get_target(manifest["target"]["name"]), folder, manifest, None, owns_build_dir=False)

    def __call__(self, *inputs: torch.Tensor):
        arrays = self._check_inputs(inputs)
        outs = backend_for(self.target).run(self.build_dir, self.target, arrays, self.manifest, self._cache)
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outs)
        return tensors[0] if self.manifest.get("single_output", False) else tensors

    def save(self, path: str | Path) -> Path:
        """Write the artifact folder to ``path`` atomically; returns the resolved path."""
        return atomic_copy_tree(self.build_dir, Path(path))

    def _check_inputs(self, inputs) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise InputError(f"expected {len(self.inputs)} input(s) "
                             f"{[(s.name, s.shape, s.dtype) for s in self.inputs]}, got {len(inputs)}")
        arrays = []
        for t, s in zip(inputs, self.inputs):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input {s.name} must be a torch.Tensor, got {type(t).__name__}")
            got = TensorSpec.of(s.name, t)
            if got.shape != s.shape or got.dtype != s.dtype:
                raise InputError(f"input {s.name}: compiled for shape {list(s.shape)} {s.dtype}, got "
                                 f"{list(got.shape)} {got.dtype}. Recompile with matching example_inputs.")
            arrays.append(np.ascontiguousarray(t.detach().cpu().numpy()))
        return arrays

    def __repr__(self) -> str:
        return (f"CompiledModel(target={self.target.name!r}, inputs={[s.shape for s in self.inputs]}, "
                f"outputs={[s.shape for s in self.outputs]}, folder={str(self.build_dir)!r})")


def new_build_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="graphopt-build-"))
