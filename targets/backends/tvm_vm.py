"""The TVM Relax VM backend: a ``model.so`` run in-process on the host, or cross-compiled with a
C++ runner and the aarch64 TVM runtime and run under qemu-user with the target's pinned CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from graphopt.artifact import read_manifest
from graphopt.errors import ToolchainError
from graphopt.targets.backends.base import IN_MEMORY, Backend, BuildResult, Measurement
from graphopt.targets.backends.emulation import package_arm_artifact, run_emulated
from graphopt.targets.lowering.phases import export_library, lower
from graphopt.targets.spec import TargetSpec


def _flatten(value) -> list:
    if hasattr(value, "numpy"):
        return [value]
    return [x for v in value for x in _flatten(v)]


class NativeVM(Backend):
    def build(self, ep, spec, build_dir, inputs, outputs, name) -> BuildResult:
        lowered = lower(ep, spec)
        export_library(lowered, spec, build_dir / "model.so")
        return BuildResult({"format": "graphopt-tvm-vm-artifact", "format_version": 1, "library": "model.so"},
                           lowered.stats)

    def run(self, build_dir, spec, arrays, manifest, cache) -> list[np.ndarray]:
        import tvm
        from tvm import relax

        if "main" not in cache:
            # TVM's pool defaults to half the hardware threads; the spec says how many to use.
            os.environ.setdefault("TVM_NUM_THREADS", str(spec.num_cores))
            lib = tvm.runtime.load_module(str(Path(build_dir) / manifest["library"]))
            cache["vm"] = relax.VirtualMachine(lib, tvm.cpu())
            cache["main"] = cache["vm"]["main"]
            cache[IN_MEMORY] = True
        result = cache["main"](*[_borrow(a) for a in arrays])
        return [_copy_out(r) for r in _flatten(result)]


def _copy_out(r) -> np.ndarray:
    """A copy of output `r` (outputs may alias constants or inputs), through DLPack: TVM's ``.numpy()``
    costs ~10x more per call, measurable on a small model (ResNet-20 at 32x32 runs in ~0.4 ms)."""
    try:
        return np.from_dlpack(r).copy()
    except RuntimeError:  # a dtype numpy has no DLPack code for (bfloat16): TVM converts it
        return r.numpy()


def _borrow(a: np.ndarray):
    """`a` as a TVM tensor without a copy when its buffer is C-contiguous and 64-byte aligned (what
    TVM's kernels assume; torch's CPU allocator aligns so) in a dtype numpy exports through DLPack
    (not ml_dtypes' bfloat16), else an aligned copy."""
    import tvm
    import tvm_ffi

    if a.dtype.kind in "biufc" and a.flags.c_contiguous and a.ctypes.data % 64 == 0 and a.flags.writeable:
        return tvm_ffi.from_dlpack(a, require_alignment=64, require_contiguous=True)
    return tvm.runtime.tensor(a)


class EmulatedVM(Backend):
    def build(self, ep, spec, build_dir, inputs, outputs, name) -> BuildResult:
        lowered = lower(ep, spec)
        so = export_library(lowered, spec, build_dir / "model.so")
        package_arm_artifact(so, spec, inputs, outputs, build_dir)
        return BuildResult({**read_manifest(build_dir), "library": "model.so"}, lowered.stats)

    def run(self, build_dir, spec, arrays, manifest, cache) -> list[np.ndarray]:
        return run_emulated(build_dir, spec, arrays).outputs

    def measure(self, build_dir, spec: TargetSpec, arrays) -> Measurement:
        try:
            run = run_emulated(build_dir, spec, arrays, count_instructions=True)
        except ToolchainError as exc:
            return Measurement(None, str(exc).splitlines()[0])
        return Measurement(run.instructions_per_inference, run.instructions_unavailable)

