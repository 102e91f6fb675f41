"""A faster int8 dot-product tensor intrinsic for aarch64 NEON without dotprod (e.g. Cortex-A53).

TVM's ``dot_4x4_i8i8s32_neon`` spends ~9 instructions per 16 MACs (``smull``, ``smull2``, two
``saddlp``, ``addp`` and the loads around them; ~0.5 per MAC in a conv's inner loop) because it
reduces over only 4 channels per call.

``neon_dot_4x<depth>_i8i8s32`` (`intrin_name(depth)`) has the same contract
(``A: int8[depth]``, ``B: int8[4, depth]`` packed contiguously, ``C: int32[4]``,
``C[i] += Σ_k int32(A[k]) · int32(B[i, k])``) over a longer reduction. The activations are loaded
once per call (``depth / 16`` q registers, shared by the 4 output lanes); per lane and 16 MACs it
issues one weight load, ``smull`` (low 8 bytes) + ``smlal2`` (high 8 bytes) into an int16x8 and
``saddlp``/``sadalp`` into an int32x4 (a 24-deep kernel's last 8 bytes: ``smull`` alone — 24-channel
layers, which a 32-deep one pads by a third: mobilenet_blocks' 24→96 conv 59.1k → 53.8k instructions on
arm-a53); a tree of 3 ``addp`` reduces the 4 lanes' vectors to the 4 outputs, added to C. That is
depth + 4 instructions per 4·depth MACs plus the activation loads: ~0.28–0.31 per MAC measured over whole
conv kernels (requantize epilogue included).

Each int16 lane sums two int8 products, which cannot overflow only if no weight is −128: the kernels
carry ``min_weight=-127`` so `int8.choose` gives layers with a −128 weight to another kernel.

`register` registers the 4×64, 4×32, 4×24 or 4×16 TVM intrinsic (`DotKernel.ensure_registered`, when a
layer first uses it); `KERNELS` (for `Feature.A64`,
AArch64 NEON, targets) are listed by `graphopt.targets.lowering.kernels` ahead of TVM's 4×4 one
(layers whose channels are not a multiple of 16, e.g. an RGB stem, keep using it).
"""
from __future__ import annotations

from tvm import s_tir
from tvm.script import tirx as T

from graphopt.targets.lowering.dot import DotKernel, dot_desc
from graphopt.targets.spec import Feature

LANES = 4  # output channels per call: one addp tree turns 4 lanes' int32x4 partial sums into 4 results
# depth → accumulator tile in int32x4 outputs (`DotKernel.accumulators`), the fewest instructions per
# MAC measured on 64- and 128-channel 3×3 convs (24: mobilenet_blocks' 24→96 1×1 conv, 53.8k at 4 and 56.1k at
# 8): larger tiles spill q registers, which the intrinsic's activation vectors, weight vectors and int16/int32
# partials already crowd
ACCUMULATORS = {64: 4, 32: 4, 16: 8, 24: 4}


def _intrin(name: str, *args, dtype: str):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), *args, dtype=dtype)


def _lane_sum(a: list, b, lane: int, depth: int):
    """int32x4 partial sums of one output lane: per 16 bytes smull + smlal2 → saddlp / sadalp (a last 8
    bytes: smull → sadalp)."""
    acc = None
    for j, a_j in enumerate(a):
        if 16 * j + 8 == depth:
            pairs = _intrin("llvm.aarch64.neon.smull.v8i16", a_j, b.vload([lane, 16 * j], "int8x8"), dtype="int16x8")
        else:
            b16 = b.vload([lane, 16 * j], "int8x16")
            pairs = (_intrin("llvm.aarch64.neon.smull.v8i16", T.vectorlow(a_j, dtype="int8x8"),
                             T.vectorlow(b16, dtype="int8x8"), dtype="int16x8")
                     + _intrin("llvm.aarch64.neon.smull.v8i16", T.vectorhigh(a_j, dtype="int8x8"),
                               T.vectorhigh(b16, dtype="int8x8"), dtype="int16x8"))
        quads = _intrin("llvm.aarch64.neon.saddlp.v4i32.v8i16", pairs, dtype="int32x4")
        acc = quads if acc is None else acc + quads
    return acc


def _addp(x, y):
    return _intrin("llvm.aarch64.neon.addp.v4i32", x, y, dtype="int32x4")


def _dot(a, b, depth: int):
    """The 4 outputs' sums as int32x4: activations loaded once, an addp tree over the lanes."""
    a16 = [a.vload([16 * j], "int8x16") for j in range(depth // 16)]
    if depth % 16:
        a16.append(a.vload([depth // 16 * 16], "int8x8"))
    s = [_lane_sum(a16, b, i, depth) for i in range(LANES)]
    return _addp(_addp(s[0], s[1]), _addp(s[2], s[3]))


def _functions(depth: int):
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (depth,), "int8", offset_factor=1)
        B = T.match_buffer(b, (LANES, depth), "int8", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:depth], B[0:LANES, 0:depth])
            T.writes(C[0:LANES])
            C[T.ramp(T.int32(0), 1, LANES)] += _dot(A, B, depth)

    return dot_desc(LANES, depth), impl


def intrin_name(depth: int) -> str:
    """The name of the 4-lane intrinsic reducing `depth` (a multiple of 8) channels."""
    return f"neon_dot_{LANES}x{depth}_i8i8s32"


def register(kernel: DotKernel) -> None:
    """Register the TVM intrinsic of `kernel` (one of `KERNELS`: its depth) unless it is."""
    if s_tir.TensorIntrin.get(kernel.intrin, allow_missing=True) is None:
        s_tir.TensorIntrin.register(kernel.intrin, *_functions(kernel.depth))


# longest reduction first (`int8.choose` takes the first kernel padding least), the 24-deep one last: it wins
# only where it pads less (24 or 72 channels; 48 take the 16-deep one, as fast with more accumulators)
KERNELS = tuple(
    DotKernel(Feature.A64, intrin_name(depth), LANES, depth, "int8", accumulators=acc, min_weight=-127,
              registrar=register)
    for depth, acc in ACCUMULATORS.items())
