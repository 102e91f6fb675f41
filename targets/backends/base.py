"""The backend contract: how artifacts for a `Runtime` are built from an `ExportedProgram`, run, and
measured. `graphopt.targets.backends.registry` maps each runtime to its backend."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphopt.targets.spec import TargetSpec


@dataclass
class BuildResult:
    manifest: dict  # backend-specific manifest fields (merged into graphopt's manifest.json)
    lowering: dict = field(default_factory=dict)  # stats for the report's "Lowering" section


@dataclass
class Measurement:
    instructions_per_inference: int | None
    note: str | None = None  # why there is no figure, or what kind of figure it is
    per_call: list[int] | None = None  # instructions of each kernel call, where the backend counts them


# Set in a `Backend.run` cache once everything the artifact runs from is loaded in memory: the artifact
# folder is then no longer checked before each call (a stat per call, for nothing).
IN_MEMORY = "in_memory"


class Backend(abc.ABC):
    @abc.abstractmethod
    def build(self, ep, spec: TargetSpec, build_dir: Path, inputs: list, outputs: list, name: str) -> BuildResult:
        """Lower ``ep`` and write a complete artifact into ``build_dir`` (inputs/outputs: TensorSpecs;
        ``name``: the model's C identifier, for symbols such as ``graphopt_<name>_run``)."""

    @abc.abstractmethod
    def run(self, build_dir: Path, spec: TargetSpec, arrays: list[np.ndarray], manifest: dict,
            cache: dict) -> list[np.ndarray]:
        """Run the artifact once on ``arrays``; outputs flattened in model order. ``cache`` belongs to
        the calling `CompiledModel` (e.g. a loaded library), so it lives and dies with it; a backend
        that no longer reads the folder sets ``cache[IN_MEMORY] = True``."""

    def measure(self, build_dir: Path, spec: TargetSpec, arrays: list[np.ndarray]) -> Measurement:
        """Instructions per inference where the backend can count them (emulated targets)."""
        return Measurement(None, "not an emulated target")
