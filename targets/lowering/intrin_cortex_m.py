"""Cortex-M DSP-extension dot-product tensor intrinsics (SMLAD: two 16x16 MACs per instruction).

Both have the contract of TVM's ``dot_4x4_i8i8s32_neon``: ``A: int8[4]`` (activations),
``B: <weight dtype>[lanes, 4]`` (packed weights), ``C: int32[lanes]``,
``C[i] += sum_k int32(A[k]) * int32(B[i, k])``. Word loads may be unaligned (allowed on ARMv7E-M
for LDR; the packed weights are word-aligned, so LLVM may pair them into LDRD).

``cortex_m_dsp_dot_<lanes>x4_i8i16s32`` (`DSP16_KERNEL`, preferred): int8 activations, weights
widened to int16 and stored in SXTB16's order when packed (`DotKernel.even_odd`: per output lane
the halfword pairs (w0, w2) and (w1, w3)). The 4 activation bytes are loaded as one word and
sign-extended once into (x0, x2) and (x1, x3) (``SXTB16`` of the word and of the word rotated by 8);
per output lane the 4 weights are two ready-made pairs (one LDRD) and two ``SMLAD``s accumulate.
Per 4 MACs: 1 LDRD + 2 SMLAD, plus (1 LDR + 2 SXTB16) / lanes for the activation — about one
instruction per MAC against 1.5 for the int8-weight kernel; costs twice the weight flash (half of
fp32's; layers above `MAX_WEIGHTS_16` weights keep int8 ones).

``cortex_m_dsp_dot_<lanes>x4_i8i8s32`` (`DSP_KERNEL`, 2 lanes): int8 weights, extended in the loop.
The activation word is sign-extended once into two halfword pairs (``SXTB16`` of the word and of
the word rotated by 8: bytes 0,2 and 1,3); per output lane the 4 weight bytes are loaded as one
word, extended the same way and accumulated with two ``SMLAD``s. Its register tile is 2 pixels × 2
lanes (`ACCUMULATORS` = 2 calls): the two calls read the same weights, which LLVM loads and extends
once for both pixels (CMSIS-NN's 2×2 tile). Per 16 MACs: 2 LDR + 4 SXTB16 for the weights, the same
for the activations, 8 SMLAD — 1.25 instructions per MAC against 1.44 for a 1-pixel × 4-lane tile.

`register` registers either TVM intrinsic (`DotKernel.ensure_registered`, when a layer first uses
it); `KERNELS` are their `DotKernel`s for
`Feature.DSP` targets, the int16-weight one first (`int8.choose` prefers it where both fit), which
`graphopt.targets.lowering.kernels` lists.
"""
from __future__ import annotations

from tvm import s_tir
from tvm.script import tirx as T

from graphopt.targets.lowering.dot import DotKernel, dot_desc
from graphopt.targets.spec import Feature

DEPTH = 4  # int8 activations per 32-bit word: one SXTB16 pair feeds two SMLADs
LANES = 4  # int16 weights: output channels per intrinsic call, the activation word expanded once for all
LANES_8 = 2  # int8 weights: 2 lanes × 2 pixels share each weight word's extension
# accumulator tile, in intrinsic outputs (`DotKernel.accumulators`). int8 weights: 2 calls of 2 sums (the
# schedule picks 2 pixels), measured on cortex-m4 residual_cnn with optimize_for="size": 20.67M instructions
# against 23.41M with 1 call of 4 lanes; 4 lanes × 2 calls (8 live sums) spill: 27.0M; 2 lanes × 4: 26.2M
# (Thumb-2 has 13 general registers, several go to operands and pointers)
ACCUMULATORS = 2
# int16 weights cost twice the flash: layers with more weights keep int8 ones (fp32 weight flash / 2 is
# the budget; 32768 keeps plain_cnn's 100k-weight dense and residual_cnn's largest conv at int8).
# larger layers keep int8 weights (`DotKernel.max_weights`): weight flash stays well under half of fp32's
MAX_WEIGHTS_16 = 32768
# int16 weights: 2 (8 live sums) measured 2.5% slower on residual_cnn, 1% faster on plain_cnn; 2 lanes × 2
# pixels 11% slower (speed mode, 18.68M vs 16.79M): no weight extension to share, the activation's is per lane
ACCUMULATORS_16 = 1


def sxtb16(word, rotate: bool):
    """Sign-extend bytes 0 and 2 (1 and 3 if `rotate`) of an int32 into two int16 halves (SXTB16)."""
    if rotate:  # LLVM folds the rotation into SXTB16's ROR #8 operand
        bits = T.reinterpret(word, dtype="uint32")
        word = T.reinterpret(T.bitwise_or(T.shift_right(bits, T.uint32(8)), T.shift_left(bits, T.uint32(24))),
                             dtype="int32")
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.arm.sxtb16"), word, dtype="int32")


def _smlad(a, b, acc):
    """acc + a.lo * b.lo + a.hi * b.hi, int16 halves (SMLAD)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.arm.smlad"), a, b, acc, dtype="int32")


def _dot4(a_word, b_word, acc):
    """acc + the 4-way int8 dot product of two words: two SMLADs over the even and odd bytes."""
    return _smlad(sxtb16(a_word, True), sxtb16(b_word, True),
                  _smlad(sxtb16(a_word, False), sxtb16(b_word, False), acc))


def _functions(lanes: int, weight_dtype: str):
    @T.prim_func(s_tir=True)
    def impl8(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (DEPTH,), "int8", offset_factor=1)
        B = T.match_buffer(b, (lanes, DEPTH), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:DEPTH], B[0:lanes, 0:DEPTH])
            T.writes(C[0:lanes])
            # meta_var: plain expressions (a TVMScript binding would become a workspace-allocated local)
            a_word = T.meta_var(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"))
            for i in T.unroll(lanes):
                C[i] = _dot4(a_word, T.reinterpret(B.vload([i, 0], "int8x4"), dtype="int32"), C[i])

    @T.prim_func(s_tir=True)
    def impl16(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (DEPTH,), "int8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 2, DEPTH // 2), "int16", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:DEPTH], B[0:lanes, 0:2, 0:DEPTH // 2])
            T.writes(C[0:lanes])
            a_word = T.meta_var(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"))
            for i in T.unroll(lanes):  # (x0, x2)·(w0, w2) + (x1, x3)·(w1, w3)
                C[i] = _smlad(sxtb16(a_word, True), T.reinterpret(B.vload([i, 1, 0], "int16x2"), dtype="int32"),
                              _smlad(sxtb16(a_word, False), T.reinterpret(B.vload([i, 0, 0], "int16x2"),
                                                                           dtype="int32"), C[i]))

    if weight_dtype == "int16":
        return dot_desc(lanes, DEPTH, weight_dtype, even_odd=True), impl16
    return dot_desc(lanes, DEPTH, weight_dtype), impl8


def intrin_name(lanes: int, weight_dtype: str) -> str:
    """The name of the SMLAD intrinsic for `lanes` output channels and int8 or int16 weights."""
    return f"cortex_m_dsp_dot_{lanes}x{DEPTH}_i8{'i16' if weight_dtype == 'int16' else 'i8'}s32"


def register(kernel: DotKernel) -> None:
    """Register the TVM intrinsic of `kernel` (one of `KERNELS`: its lanes and weight type) unless it is."""
    if s_tir.TensorIntrin.get(kernel.intrin, allow_missing=True) is None:
        s_tir.TensorIntrin.register(kernel.intrin, *_functions(kernel.lanes, kernel.weight_dtype))


DSP_KERNEL = DotKernel(feature=Feature.DSP, intrin=intrin_name(LANES_8, "int8"), lanes=LANES_8, depth=DEPTH,
                       data_dtype="int8", accumulators=ACCUMULATORS, registrar=register)
DSP16_KERNEL = DotKernel(feature=Feature.DSP, intrin=intrin_name(LANES, "int16"), lanes=LANES, depth=DEPTH,
                         data_dtype="int8", accumulators=ACCUMULATORS_16, weight_dtype="int16",
                         max_weights=MAX_WEIGHTS_16, even_odd=True, registrar=register)
KERNELS = (DSP16_KERNEL, DSP_KERNEL)  # int16 weights first: small layers take them
