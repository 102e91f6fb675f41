"""An int8 dot-product tensor intrinsic for aarch64 with dotprod (e.g. Cortex-A55/A76): indexed ``sdot``.

TVM's ``dot_4x4_i8i8s32_sdot`` reduces over 4 channels per call: it broadcasts 4 activation bytes
(``ld1r``) and loads 16 weight bytes for one ``sdot``, so a pixel × channel-vector tile issues
about one load per ``sdot``.

``sdot_4x16_i8i8s32`` reduces over 16 channels: one 16-byte activation load feeds 4 indexed
``sdot vC.4s, vB.16b, vA.4b[j]`` (j = 0..3), each with a 16-byte weight vector holding the 4
output lanes' 4 channels of chunk j. Its weights are therefore packed chunk-major
(``B: int8[depth/4, lanes, 4]``, `DotKernel.chunk` = 4), the layout `int8` packs and indexes for it:

    C[i] += Σ_k int32(A[k]) · int32(B[k / 4, i, k % 4])        i < 4, k < 16

``sdot_4x4_i8i8s32`` (`KERNEL_4x4`) has the contract of TVM's ``dot_4x4_i8i8s32_sdot`` (one ``ld1r`` of 4
activation bytes, one 16-byte weight load, one ``sdot``) for layers whose reduction is not a multiple of
16 (an RGB stem, 8-channel groups). TVM's implementation names its operands as local buffers, and each
becomes a workspace allocation per parallel iteration of the kernel (6 runtime calls to allocate and 6 to
free: a grouped 24→32 3×3 conv at 8×8 spent 38k of its 67k arm-a55 instructions in them); this one is a
single expression, as `KERNEL`'s is.

`register` / `register_4x4` register the TVM intrinsics (`DotKernel.ensure_registered`, when a layer first
uses them); `KERNEL` and `KERNEL_4x4` (for `Feature.DOTPROD` targets) are listed by
`graphopt.targets.lowering.kernels`, `KERNEL` first.
"""
from __future__ import annotations

from tvm import s_tir
from tvm.script import tirx as T

from graphopt.targets.lowering.dot import DotKernel, dot_desc
from graphopt.targets.spec import Feature

LANES, DEPTH, CHUNK = 4, 16, 4  # int32 outputs per sdot, channels per call, channels per sdot lane
# accumulator tile budget in int32x4 outputs, measured on int8 ResNet-18 64×64 (arm-a55 instructions):
# 8 → 2 pixels × 4 vectors (8 accumulators + 16 weight + 2 activation q registers), 18.0M;
# 16 or 24 → 4 × 4, whose 16 weight registers no longer fit beside 16 accumulators: spills, 20.1M
ACCUMULATORS = 8
NAME = f"sdot_{LANES}x{DEPTH}_i8i8s32"


def _functions():
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (DEPTH,), "int8", offset_factor=1)
        B = T.match_buffer(b, (DEPTH // CHUNK, LANES, CHUNK), "int8", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:DEPTH], B[0:DEPTH // CHUNK, 0:LANES, 0:CHUNK])
            T.writes(C[0:LANES])
            C[T.ramp(T.int32(0), 1, LANES)] = _sdots(A, B, C)

    return dot_desc(LANES, DEPTH, chunk=CHUNK), impl


def _sdots(a, b, c):
    """C + Σ_j sdot(B[j], A's int32 lane j broadcast): LLVM folds the broadcast into ``sdot …4b[j]``."""
    a32 = T.reinterpret(a.vload([0], "int8x16"), dtype="int32x4")
    acc = c.vload([0], "int32x4")
    for j in range(DEPTH // CHUNK):
        aj = T.reinterpret(T.Shuffle([a32], [j] * 4), dtype="int8x16")
        acc = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                                      acc, b.vload([j, 0, 0], "int8x16"), aj, dtype="int32x4")
    return acc


def register(kernel: DotKernel) -> None:
    """Register the TVM intrinsic of `kernel` (`KERNEL`) unless it is."""
    if s_tir.TensorIntrin.get(kernel.intrin, allow_missing=True) is None:
        s_tir.TensorIntrin.register(kernel.intrin, *_functions())


KERNEL = DotKernel(Feature.DOTPROD, NAME, LANES, DEPTH, "int8", ACCUMULATORS, chunk=CHUNK, registrar=register)


NAME_4x4 = f"sdot_{LANES}x{CHUNK}_i8i8s32"


def _functions_4x4():
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (CHUNK,), "int8", offset_factor=1)
        B = T.match_buffer(b, (LANES, CHUNK), "int8", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:CHUNK], B[0:LANES, 0:CHUNK])
            T.writes(C[0:LANES])
            C[T.ramp(T.int32(0), 1, LANES)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), C.vload([0], "int32x4"),
                B.vload([0, 0], "int8x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), LANES),
                              dtype="int8x16"), dtype="int32x4")

    return dot_desc(LANES, CHUNK), impl


def register_4x4(kernel: DotKernel) -> None:
    """Register the TVM intrinsic of `kernel` (`KERNEL_4x4`) unless it is."""
    if s_tir.TensorIntrin.get(kernel.intrin, allow_missing=True) is None:
        s_tir.TensorIntrin.register(kernel.intrin, *_functions_4x4())


# TVM's 4×4 sdot kernel had 24 accumulators
KERNEL_4x4 = DotKernel(Feature.DOTPROD, NAME_4x4, LANES, CHUNK, "int8", 24, registrar=register_4x4)
