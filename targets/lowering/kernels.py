"""The dot-kernel registry: which tensorized int8 kernels a target's layers may use, preferred first.

`builtin_kernels` lists graphopt's kernels explicitly, one line each (TVM's own x86 VNNI, aarch64
sdot and NEON 4×4 intrinsics, and graphopt's in `intrin_i8mm`, `intrin_dotprod`, `intrin_neon`,
`intrin_cortex_m`); `register_dot_kernel` adds a user's. `dot_kernels(spec)` filters by the
target's features (data, never target names); earlier kernels win where several fit a layer.

The registry is data: listing or filtering kernels registers no TVM intrinsic. Each kernel's
intrinsic is registered when a layer is first tensorized with it (`DotKernel.ensure_registered`,
called by the tensorizing schedule), so an fp32 model registers none and an int8 one only those its
layers use. `prepare_tvm(spec)` registers the TVM intrinsics MetaSchedule's rules for `spec` name,
for tuning and for applying a tuning database (`intrin_tvm`); `register_intrinsic(name)` the one
intrinsic a stored tuning record names, for the database that reads it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

from graphopt.targets.lowering import intrin_cortex_m, intrin_dotprod, intrin_i8mm, intrin_neon, intrin_tvm
from graphopt.targets.lowering.dot import DotKernel
from graphopt.targets.spec import Feature, TargetSpec


class _Named(Protocol):
    @property
    def intrin(self) -> str: ...


K = TypeVar("K", bound=_Named)


def prepare_tvm(spec: TargetSpec) -> None:
    """Register the TVM intrinsics MetaSchedule's rules for `spec` name and those of `spec`'s dot
    kernels (tuned records of tensorized kernels replay their ``tensorize``), before tuning or applying
    a tuning database; GPU/DSP intrinsic modules stay stubbed (importing them costs ~1 min CPU)."""
    intrin_tvm.load_for(spec)
    for kernel in dot_kernels(spec):
        kernel.ensure_registered()


def register_intrinsic(name: str) -> bool:
    """Register the TVM tensor intrinsic `name` in this process if a dot kernel or one of TVM's CPU
    intrinsic modules defines it (a tuning record replaying ``tensorize`` with it needs it first,
    whatever this process compiled before); False if none does."""
    kernel = by_intrin(_registry(), name)
    if kernel is not None:
        kernel.ensure_registered()
        return True
    return intrin_tvm.load_defining(name)


def builtin_kernels() -> list[DotKernel]:
    """graphopt's dot kernels, preferred first (their intrinsics are registered on first use)."""
    tvm_own = intrin_tvm.register
    return [
        DotKernel(Feature.AVX512_VNNI, "dot_16x4_vnni", 16, 4, "uint8", 16, registrar=tvm_own),  # LLVM 22-fixed
        intrin_i8mm.KERNEL,  # smmla 2 pixels × 2 channels, where a layer has 2 pixels per row and reduces ≥ 128
        intrin_dotprod.KERNEL,  # indexed sdot 4×16
        intrin_dotprod.KERNEL_4x4,  # sdot 4×4 (TVM's contract, no workspace allocations)
        *intrin_neon.KERNELS,  # NEON 4×64/4×32/4×16, ahead of TVM's 4×4 NEON (aarch64 intrinsics)
        DotKernel(Feature.A64, "dot_4x4_i8i8s32_neon", 4, 4, "int8", 16, registrar=tvm_own),
        *intrin_cortex_m.KERNELS,  # Cortex-M DSP: int16 weights (small layers), then int8
    ]


_KERNELS: list[DotKernel] = []


def _registry() -> list[DotKernel]:
    if not _KERNELS:
        _KERNELS.extend(builtin_kernels())
    return _KERNELS


def register_dot_kernel(kernel: DotKernel, before: str | None = None) -> DotKernel:
    """Add `kernel` (before the kernel whose intrinsic is `before`, else last); earlier kernels are
    preferred where several fit a layer equally well. Its intrinsic must be registered already, or
    be registered by its `DotKernel.registrar` when a layer first uses it."""
    kernels = _registry()
    at = next((i for i, k in enumerate(kernels) if k.intrin == before), len(kernels))
    kernels.insert(at, kernel)
    return kernel


def dot_kernels(spec: TargetSpec) -> tuple[DotKernel, ...]:
    """The dot kernels int8 layers may use on `spec`, preferred first (empty: the generic int8 path)."""
    return tuple(k for k in _registry() if spec.has(k.feature))


def dot_kernel(spec: TargetSpec) -> DotKernel | None:
    """The preferred dot kernel on `spec`, if any."""
    return next(iter(dot_kernels(spec)), None)


def by_intrin(kernels: Iterable[K], name: str) -> K | None:
    """The kernel of `kernels` (dot kernels, or others naming an ``intrin``) whose intrinsic is `name`."""
    return next((k for k in kernels if k.intrin == name), None)
