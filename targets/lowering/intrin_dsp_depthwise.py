"""Cortex-M DSP-extension tensor intrinsics of the depthwise int8 conv (`int8.legalize_depthwise_dsp`).

A depthwise conv reduces over taps, each output channel on its own, so the dense kernels' ``SMLAD``
(two products into one sum) does not fit it. These intrinsics do one tap of 4 neighbouring channels,
one accumulator each (as CMSIS-NN's ``arm_depthwise_conv_s8_opt``):

    C[i] += int32(A[i]) · int32(B[weight(i)])        i < `LANES`

with A the 4 channels' int8 activations at the tap (contiguous in NHWC) and B their packed weights.
The activation word is loaded once and sign-extended into (x0, x2) and (x1, x3) (``SXTB16`` of the
word and of the word rotated by 8); ``SMLABB`` / ``SMLATT`` multiply the bottom / top halves into
each channel's accumulator:

- `KERNEL_16` (``cortex_m_dsp_depthwise_4_i8i16s32``): weights widened to int16 when packed, in the
  extension's order — B ``[2, 2]``, ``B[p, h]`` the weight of channel 2h + p —: one ``LDRD`` of both
  pairs. Per tap and 4 channels: ``LDR``, 2 ``SXTB16``, ``LDRD``, 4 ``SMLAxy``: 2 instructions per MAC.
- `KERNEL_8` (``cortex_m_dsp_depthwise_4_i8i8s32``): int8 weights (B ``[4]``), extended in the loop like
  the activations: 2 more ``SXTB16``, 2.5 instructions per MAC; half the weight flash.

`KERNELS` lists both, int16 first; they carry `weight_dtype` / `max_weights` / `min_weight` as the dot
kernels do, so `int8` applies the same weight-storage policy (`optimize_for`, the board's flash) to them.
`DepthwiseKernel.ensure_registered` registers a kernel's intrinsic with TVM when a layer first uses it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from tvm import s_tir
from tvm.script import tirx as T

from graphopt.targets.lowering.intrin_cortex_m import MAX_WEIGHTS_16, sxtb16

LANES = 4  # channels per call: the int8 activations of one 32-bit word
_REGISTERING = threading.Lock()


@dataclass(frozen=True)
class DepthwiseKernel:
    """A depthwise tensor intrinsic: its name, weight storage and the weights it takes."""

    intrin: str
    weight_dtype: str  # "int16": widened when packed, [2, 2] per call; "int8": [4]
    max_weights: int | None = None  # larger layers take int8 weights under optimize_for="balanced"
    min_weight: int = -128
    lanes: int = LANES

    def pack(self, taps):
        """[..., channels] int8 weights (channels a multiple of `LANES`) → the intrinsic's layout,
        ``[..., channels/4, 2, 2]`` (int16) or ``[..., channels/4, 4]`` (int8)."""
        tiles = taps.reshape(*taps.shape[:-1], -1, LANES)
        if self.weight_dtype == "int8":
            return np.ascontiguousarray(tiles)
        return np.ascontiguousarray(np.swapaxes(tiles.reshape(*tiles.shape[:-1], 2, 2), -1, -2)).astype(np.int16)

    def weight(self, wp, outer: tuple, lane):
        """The packed weight of channel lane `lane` of the call at `outer`."""
        return wp[(*outer, lane)] if self.weight_dtype == "int8" else wp[(*outer, lane % 2, lane // 2)]

    def ensure_registered(self) -> None:
        """Register the kernel's TVM intrinsic unless this process has (before tensorizing with it)."""
        with _REGISTERING:
            if s_tir.TensorIntrin.get(self.intrin, allow_missing=True) is None:
                s_tir.TensorIntrin.register(self.intrin, *_functions(self))


def _smla(name: str, a, b, acc):
    """acc + the product of a's and b's bottom (b) or top (t) int16 halves (``SMLA<name>``)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(f"llvm.arm.smla{name}"), a, b, acc, dtype="int32")


def _weight_pair(kernel: DepthwiseKernel, B, odd: int):
    """The int16 weights of channels (0, 2) (`odd` 0) or (1, 3) as one word: loaded, or extended from int8."""
    if kernel.weight_dtype == "int8":
        return sxtb16(T.reinterpret(B.vload([0], "int8x4"), dtype="int32"), bool(odd))
    return T.reinterpret(B.vload([odd, 0], "int16x2"), dtype="int32")


def _functions(kernel: DepthwiseKernel):
    shape = (LANES,) if kernel.weight_dtype == "int8" else (2, 2)
    whole = tuple(slice(0, d) for d in shape)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (LANES,), "int8", offset_factor=1)
        B = T.match_buffer(b, shape, kernel.weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:LANES], B[whole])
            T.writes(C[0:LANES])
            for i in T.serial(LANES):
                with T.sblock("update"):
                    vi = T.axis.spatial(LANES, i)
                    C[vi] = C[vi] + T.cast(A[vi], "int32") * T.cast(kernel.weight(B, (), vi), "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (LANES,), "int8", offset_factor=1)
        B = T.match_buffer(b, shape, kernel.weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:LANES], B[whole])
            T.writes(C[0:LANES])
            # meta_var: plain expressions (a TVMScript binding would become a workspace-allocated local)
            x = T.meta_var(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"))
            x02 = T.meta_var(sxtb16(x, False))
            x13 = T.meta_var(sxtb16(x, True))
            w02 = T.meta_var(_weight_pair(kernel, B, 0))
            w13 = T.meta_var(_weight_pair(kernel, B, 1))
            C[0] = _smla("bb", x02, w02, C[0])
            C[1] = _smla("bb", x13, w13, C[1])
            C[2] = _smla("tt", x02, w02, C[2])
            C[3] = _smla("tt", x13, w13, C[3])

    return desc, impl


KERNEL_16 = DepthwiseKernel("cortex_m_dsp_depthwise_4_i8i16s32", "int16", max_weights=MAX_WEIGHTS_16)
KERNEL_8 = DepthwiseKernel("cortex_m_dsp_depthwise_4_i8i8s32", "int8")
KERNELS = (KERNEL_16, KERNEL_8)  # int16 weights first, where the weight-storage policy allows them
