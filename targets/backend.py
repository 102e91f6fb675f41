"""Backends: how artifacts for a `Runtime` are built from an `ExportedProgram`, run, and measured.

`graphopt.compile` and `CompiledModel` only talk to the backend registered for the target's
runtime, so a new kind of artifact (e.g. a runtime-free C library) plugs in with
`register_backend` and no change to the API. Refuses: a runtime with no registered backend.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from graphopt.targets.spec import Runtime, TargetSpec

from graphopt.errors import ConfigError


@dataclass
class BuildResult:
    manifest: dict  # backend-specific manifest fields (merged into graphopt's manifest.json)
    lowering: dict = field(default_factory=dict)  # stats for the report's "Lowering" section


@dataclass
class Measurement:
    instructions_per_inference: int | None
    note: str | None = None  # why there is no figure, or what kind of figure it is
    per_call: list[int] | None = None  # instructions of each kernel call, where the backend counts them


class Backend(abc.ABC):
    @abc.abstractmethod
    def build(self, ep, spec: TargetSpec, build_dir: Path, inputs: list, outputs: list,
              progress: Callable[[str], None], name: str) -> BuildResult:
        """Lower ``ep`` and write a complete artifact into ``build_dir`` (inputs/outputs: TensorSpecs;
        ``name``: the model's C identifier, for symbols such as ``graphopt_<name>_run``)."""

    @abc.abstractmethod
    def run(self, build_dir: Path, spec: TargetSpec, arrays: list[np.ndarray], manifest: dict,
            cache: dict) -> list[np.ndarray]:
        """Run the artifact once on ``arrays``; outputs flattened in model order. ``cache`` belongs to
        the calling `CompiledModel` (e.g. a loaded library), so it lives and dies with it."""

    def measure(self, build_dir: Path, spec: TargetSpec, arrays: list[np.ndarray]) -> Measurement:
        """Instructions per inference where the backend can count them (emulated targets)."""
        return Measurement(None, "not an emulated target")


_BACKENDS: dict[Runtime, Backend | Callable[[], Backend]] = {}


def register_backend(runtime: Runtime, backend: Backend | Callable[[], Backend]) -> None:
    _BACKENDS[runtime] = backend


def backend_for(spec: TargetSpec) -> Backend:
    entry = _BACKENDS.get(spec.runtime)
    if entry is None:
        raise ConfigError(f"target {spec.name!r} uses runtime {spec.runtime.value!r}, for which no backend is "
                          f"registered (have: {sorted(r.value for r in _BACKENDS)}).")
    if not isinstance(entry, Backend):
        entry = _BACKENDS[spec.runtime] = entry()
    return entry
