"""ARM Cortex-A (aarch64 Linux) targets: artifacts are TVM VM libraries run by a C++ runner, or,
for the ``-c`` variants, runtime-free C libraries.

`arm` is an alias of `arm-a72` (the common Cortex-A72 / Raspberry Pi 4 class: NEON, no dotprod).
QEMU CPUs are pinned per target. QEMU 7.2 has no Cortex-A55 model, so `arm-a55` runs on its
`cortex-a76` (the same ARMv8.2 + dotprod ISA, no SVE); its `cortex-a76` lacks i8mm, so `arm-a76`
runs on `max` — the only place `max` is used, because i8mm is meant there.

Each has a ``-c`` variant (`arm-a55-c`, …): the same kernels as a self-contained C library, as for
armv7 and the Cortex-M (`graphopt.targets.backends.c_emitter`): no TVM runtime on the device, no
malloc, one static arena, a direct call per kernel — and one thread (the VM variants run the kernels
on a thread pool). For single-threaded or minimal deployments; figures in docs/benchmarks.md.
"""
import dataclasses
from typing import Any

from graphopt.targets.spec import Feature, Runtime, TargetSpec

_COMMON: dict[str, Any] = dict(
    runtime=Runtime.TVM_VM_QEMU_USER,
    vector_bits=128,
    cross_compiler="aarch64-linux-gnu-g++",
    sysroot="/usr/aarch64-linux-gnu",
    qemu_binary="qemu-aarch64",
    channel_multiple=4,
)


def _aarch64(mcpu: str, mattr: list[str]) -> dict:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": mattr, "num-cores": 4}


_VM_SPECS = (
    TargetSpec(name="arm-a72", description="Cortex-A72 aarch64 Linux, NEON (Raspberry Pi 4 class)",
               tvm_target=_aarch64("cortex-a72", ["+neon"]), features={Feature.A64, Feature.FP_ROUND, Feature.NEON},
               num_cores=4,
               qemu_cpu="cortex-a72", aliases=("arm",), **_COMMON),
    TargetSpec(name="arm-a53", description="Cortex-A53 aarch64 Linux, NEON, in-order",
               tvm_target=_aarch64("cortex-a53", ["+neon"]), features={Feature.A64, Feature.FP_ROUND, Feature.NEON},
               num_cores=4,
               qemu_cpu="cortex-a53", **_COMMON),
    TargetSpec(name="arm-a55", description="Cortex-A55 aarch64 Linux, NEON + dotprod",
               tvm_target=_aarch64("cortex-a55", ["+neon", "+dotprod"]),
               features={Feature.A64, Feature.FP_ROUND, Feature.NEON, Feature.DOTPROD, Feature.FP16}, num_cores=4,
               qemu_cpu="cortex-a76", **_COMMON),
    TargetSpec(name="arm-a76", description="Cortex-A76-class aarch64 Linux, NEON + dotprod + i8mm",
               tvm_target=_aarch64("cortex-a76", ["+neon", "+dotprod", "+i8mm"]),
               features={Feature.A64, Feature.FP_ROUND, Feature.NEON, Feature.DOTPROD, Feature.I8MM, Feature.FP16},
               num_cores=4,
               qemu_cpu="max", **_COMMON),
)


def _c_library(spec: TargetSpec) -> TargetSpec:
    """`spec`'s kernels as a runtime-free C library: one thread, compiled for its CPU."""
    return dataclasses.replace(
        spec, name=f"{spec.name}-c", description=f"{spec.description}; runtime-free C library, one thread",
        tvm_target={**spec.tvm_target, "num-cores": 1}, runtime=Runtime.C_LIBRARY_QEMU_USER, num_cores=1,
        cross_compiler="aarch64-linux-gnu-gcc", cflags=(f"-mcpu={spec.tvm_target['mcpu']}",), aliases=())


SPECS: tuple[TargetSpec, ...] = _VM_SPECS + tuple(_c_library(spec) for spec in _VM_SPECS)
