"""Cortex-M DSP-extension int8 dot-product tensor intrinsic (SMLAD: two 16x16 MACs per instruction).

`dsp_dot_intrin(lanes)` registers ``cortex_m_dsp_dot_<lanes>x4_i8i8s32`` with the contract of TVM's
``dot_4x4_i8i8s32_neon``: ``A: int8[4]``, ``B: int8[lanes, 4]``, ``C: int32[lanes]``,
``C[i] += sum_k int32(A[k]) * int32(B[i, k])``. The implementation loads the 4 activation bytes as
one word and sign-extends them once into two halfword pairs (``SXTB16`` of the word and of the word
rotated by 8: bytes 0,2 and 1,3); per output lane it loads the 4 weight bytes as one word, extends
them the same way and accumulates with two ``SMLAD``s. Per 4 MACs: 1 LDR, 2 SXTB16, 2 SMLAD, plus
(1 LDR + 2 SXTB16) / lanes for the activation. Word loads may be unaligned (allowed on ARMv7E-M).

Importing the module registers the 4-lane intrinsic and its `DotKernel` for `Feature.DSP` targets
(`DSP_KERNEL`) with `graphopt.targets.int8`.
"""
from __future__ import annotations

from graphopt.targets.int8 import DotKernel, register_dot_kernel
from graphopt.targets.spec import Feature
from tvm import s_tir
from tvm.script import tirx as T

DEPTH = 4  # int8 values per 32-bit word: one SXTB16 pair feeds two SMLADs
LANES = 4  # output channels per intrinsic call: the activation word is expanded once for all of them
# accumulator tile, in `LANES`-wide intrinsic outputs (`DotKernel.accumulators`): one call's 4 int32 sums;
# 8 live int32 sums spill (Thumb-2 has 13 general registers, 6 go to operands and pointers)
ACCUMULATORS = 1


def _sxtb16(word, rotate: bool):
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
    return _smlad(_sxtb16(a_word, True), _sxtb16(b_word, True),
                  _smlad(_sxtb16(a_word, False), _sxtb16(b_word, False), acc))


def _functions(lanes: int):
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (DEPTH,), "int8", offset_factor=1)
        B = T.match_buffer(b, (lanes, DEPTH), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:DEPTH], B[0:lanes, 0:DEPTH])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, DEPTH):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
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

    return desc, impl


def dsp_dot_intrin(lanes: int = LANES) -> str:
    """Register (once) the SMLAD intrinsic for `lanes` output channels; returns its name."""
    name = f"cortex_m_dsp_dot_{lanes}x{DEPTH}_i8i8s32"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is None:
        s_tir.TensorIntrin.register(name, *_functions(lanes))
    return name


INTRIN = dsp_dot_intrin()

DSP_KERNEL = register_dot_kernel(DotKernel(feature=Feature.DSP, intrin=INTRIN, lanes=LANES, depth=DEPTH,
                                            data_dtype="int8", accumulators=ACCUMULATORS))
