"""An int8 matrix-multiply tensor intrinsic for aarch64 with i8mm (e.g. Cortex-A76-class, Neoverse N2): ``smmla``.

``smmla vC.4s, vA.16b, vB.16b`` adds the 2×2 int32 product of a 2×8 and an 8×2 int8 matrix to C:
with A = 2 pixels × 8 channels and B = 2 output channels × 8 channels it does 32 multiply-adds, twice
an ``sdot``'s, and its accumulator holds a 2-pixel × 2-channel block (p0c0, p0c1, p1c0, p1c1).

``smmla_2x2x16_i8i8s32`` (a `DotKernel` with ``pixels=2``) covers 2 pixels × 2 output channels × 16
reduced channels: the two pixels' 16-byte activation rows (any row stride) are loaded and zipped by
64-bit halves into two 2×8 operands, the weights are packed chunk-major (``B: int8[depth/8, lanes, 8]``,
`DotKernel.chunk` = 8: each 16-byte load is a channel pair's 8 channels), and C is the instruction's
2×2 block, kept in that order by the compute (`dot.mmla_desc`; the register tile unrolls calls):

    C[p, i] += Σ_k int32(A[p, k]) · int32(B[k / 8, i, k % 8])        p < 2, i < 2, k < 16

`register` registers the TVM intrinsic (`KERNEL.ensure_registered`, when a layer first uses it);
`KERNEL` (for `Feature.I8MM` targets) is listed by `graphopt.targets.lowering.kernels` ahead of the
indexed-``sdot`` kernel; `int8.choose` takes it where its reduction pads no more, a layer has more
than one pixel per row (a batch-1 dense keeps ``sdot``: a 2-pixel tile would compute a zero row) and
each output reduces at least `MIN_REDUCTION` values.
"""
from __future__ import annotations

from tvm import s_tir
from tvm.script import tirx as T

from graphopt.targets.lowering.dot import DotKernel, mmla_desc
from graphopt.targets.spec import Feature

LANES, DEPTH, CHUNK, PIXELS = 2, 16, 8, 2  # output channels, reduced channels per call, per smmla, pixels
# measured on int8 ResNet-18 64×64 (arm-a76 instructions): depth 16 11.79M, 8 12.80M, 32 12.19M; 2 channel
# pairs per call 15.87M (the register tile unrolls calls of one pair instead)
# accumulator tile budget in intrinsic calls (each one int32x4 2×2 block), measured on int8 ResNet-18 64×64:
# 8 → 12.92M instructions, 16 (4 pairs × 4 channel pairs: 16 accumulators, 8 weight and 4–8 activation
# q registers) 11.79M, 24 the same
ACCUMULATORS = 16
# its epilogue reads the 2×2 blocks back per output (≈ 3× sdot's per output), which a short reduction does not
# repay: on MobileNetV2 64×64 (arm-a76) 1×1 convs reducing 16–96 channels measured 0.97–1.98× sdot's
# instructions, 144 and more 0.61–0.92×; ResNet-18's 3×3 convs (≥ 576) 0.72× overall
MIN_REDUCTION = 128
NAME = f"smmla_{PIXELS}x{LANES}x{DEPTH}_i8i8s32"


def _functions():
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (PIXELS, DEPTH), "int8", offset_factor=1, strides=[T.int32(), 1])
        B = T.match_buffer(b, (DEPTH // CHUNK, LANES, CHUNK), "int8", offset_factor=1)
        C = T.match_buffer(c, (PIXELS, LANES), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:PIXELS, 0:LANES], A[0:PIXELS, 0:DEPTH], B[0:DEPTH // CHUNK, 0:LANES, 0:CHUNK])
            T.writes(C[0:PIXELS, 0:LANES])
            C[0, T.ramp(T.int32(0), 1, 4)] = _smmlas(A, B, C)  # the 2×2 block: 4 contiguous int32

    return mmla_desc(DEPTH, CHUNK), impl


def _smmlas(a, b, c):
    """C + Σ_j smmla(the pixels' channels 8j..8j+7, B[j]): rows zipped by 64-bit halves (``zip1/zip2 .2d``)."""
    n = DEPTH // CHUNK  # 64-bit halves per row
    rows = [T.reinterpret(a.vload([p, 0], f"int8x{DEPTH}"), dtype=f"int64x{n}") for p in range(PIXELS)]
    acc = c.vload([0, 0], "int32x4")
    for j in range(n):
        aj = T.reinterpret(T.Shuffle(rows, [j, n + j]), dtype="int8x16")
        acc = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smmla.v4i32.v16i8"),
                                      acc, aj, b.vload([j, 0, 0], "int8x16"), dtype="int32x4")
    return acc


def register(kernel: DotKernel) -> None:
    """Register the TVM intrinsic of `kernel` (`KERNEL`) unless it is."""
    if s_tir.TensorIntrin.get(kernel.intrin, allow_missing=True) is None:
        s_tir.TensorIntrin.register(kernel.intrin, *_functions())


KERNEL = DotKernel(Feature.I8MM, NAME, LANES, DEPTH, "int8", ACCUMULATORS, chunk=CHUNK, pixels=PIXELS,
                   min_reduction=MIN_REDUCTION, registrar=register)
