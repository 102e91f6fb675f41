"""The dot-kernel registry: which tensorized int8 kernels a target's layers may use, preferred first.

`builtin_kernels` lists graphopt's kernels explicitly, one line each (TVM's own x86 VNNI, aarch64
sdot and NEON 4×4 intrinsics, and graphopt's in `intrin_i8mm`, `intrin_dotprod`, `intrin_neon`,
`intrin_cortex_m`); `register_dot_kernel` adds a user's. `dot_kernels(spec)` filters by the
target's features (data, never target names); earlier kernels win where several fit a layer.

`prepare_tvm` registers TVM's CPU tensor intrinsics once per process, around two measured traps of
apache-tvm 0.27: importing every GPU/DSP intrinsic module costs ~1 min CPU (they are stubbed), and
LLVM 22 rejects the x86 ``dot_16x4_vnni`` intrinsic's operand types (it is re-registered with the
types LLVM 22 wants).
"""
from __future__ import annotations

import sys
import types

from graphopt.targets.lowering.dot import DotKernel
from graphopt.targets.spec import Feature, TargetSpec

_PREPARED = False


def prepare_tvm() -> None:
    """Stub the GPU/DSP tensor-intrinsic modules (CPU tuning never uses them; importing them costs
    ~1 min CPU per process) and re-register the VNNI intrinsic for LLVM 22. Idempotent."""
    global _PREPARED
    if _PREPARED:
        return
    for name in ("cuda", "rocm", "hexagon", "metal"):
        full = f"tvm.s_tir.tensor_intrin.{name}"
        sys.modules.setdefault(full, types.ModuleType(full))
    import tvm.s_tir.tensor_intrin  # noqa: F401  registers the CPU intrinsics
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def vnni_impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),  # type: ignore[valid-type]  # TVMScript
        B: T.Buffer((16, 4), "int8", offset_factor=1),  # type: ignore[valid-type]  # TVMScript
        C: T.Buffer((16,), "int32", offset_factor=1),  # type: ignore[valid-type]  # TVMScript
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            A_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            A_i8x64 = T.reinterpret(T.broadcast(A_i32, 16), dtype="int8x64")
            B_i8x64 = B.vload([0, 0], dtype="int8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"), A_i8x64, B_i8x64, dtype="int32x16")

    # LLVM 22's vpdpbusd takes (<16 x i32>, <64 x i8>, <64 x i8>); TVM 0.27 passes i32 vectors
    TensorIntrin.register("dot_16x4_vnni", dot_product_16x4_u8i8i32_desc, vnni_impl, override=True)
    _PREPARED = True


def builtin_kernels() -> list[DotKernel]:
    """graphopt's dot kernels, preferred first (registers their TVM intrinsics on first call)."""
    prepare_tvm()
    from graphopt.targets.lowering import intrin_cortex_m, intrin_dotprod, intrin_i8mm, intrin_neon

    return [
        DotKernel(Feature.AVX512_VNNI, "dot_16x4_vnni", 16, 4, "uint8", 16),  # TVM's (fixed by prepare_tvm)
        intrin_i8mm.KERNEL,  # smmla 2 pixels × 2 channels, where a layer has 2 pixels per row and reduces ≥ 128
        intrin_dotprod.KERNEL,  # indexed sdot 4×16, ahead of TVM's 4×4 sdot
        DotKernel(Feature.DOTPROD, "dot_4x4_i8i8s32_sdot", 4, 4, "int8", 24),
        *intrin_neon.KERNELS,  # NEON 4×64/4×32/4×16, ahead of TVM's 4×4 NEON (aarch64 intrinsics)
        DotKernel(Feature.A64, "dot_4x4_i8i8s32_neon", 4, 4, "int8", 16),
        *intrin_cortex_m.KERNELS,  # Cortex-M DSP: int16 weights (small layers), then int8
    ]


_KERNELS: list[DotKernel] = []


def _registry() -> list[DotKernel]:
    if not _KERNELS:
        _KERNELS.extend(builtin_kernels())
    return _KERNELS


def register_dot_kernel(kernel: DotKernel, before: str | None = None) -> DotKernel:
    """Add `kernel` (before the kernel whose intrinsic is `before`, else last); earlier kernels are
    preferred where several fit a layer equally well."""
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


def by_intrin(kernels, name: str) -> DotKernel | None:
    return next((k for k in kernels if k.intrin == name), None)
