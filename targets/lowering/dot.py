"""The dot-kernel contract: what a tensorized int8 dot-product intrinsic computes and how its packed
weights are laid out.

A `DotKernel` names a registered TVM tensor intrinsic with the contract

    C[i] += Σ_k int32(A[k]) · int32(B[i, k])        i < lanes, k < depth      (A: activations, B: weights)

and the target feature that enables it; `dot_desc` is the TensorIntrin description every kernel
shares (B in the packed tile layout of `tile`). Intrinsic modules (`intrin_*.py`) build kernels
from these; `graphopt.targets.lowering.kernels` lists them; `int8` packs weights for them. A kernel
carries the function of its module that registers its intrinsic with TVM (`DotKernel.registrar`),
called by `DotKernel.ensure_registered` when a layer is first tensorized with it: registering parses
TVMScript (tenths of a second per intrinsic), which a model that never uses the kernel must not pay.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from graphopt.targets.spec import Feature

DOT_ATTR = "graphopt.dot_intrin"  # block annotation: the intrinsic the tensorizing rule applies
_REGISTERING = threading.Lock()  # two compiles in threads must not both register one intrinsic

@dataclass(frozen=True)
class DotKernel:
    """A dot-product tensor intrinsic and the target feature that enables it."""

    feature: Feature
    intrin: str  # registered TensorIntrin name
    lanes: int  # output channels per call (int32 results)
    depth: int  # reduction elements per output per call
    data_dtype: str  # "int8", or "uint8": activations are shifted by +128
    accumulators: int  # vector registers the accumulator tile may use
    weight_dtype: str = "int8"  # "int16": weights widened when packed (e.g. for 16-bit MAC pairs)
    min_weight: int = -128  # e.g. −127 for kernels summing two int8 products in an int16 lane
    max_weights: int | None = None  # larger layers take another kernel (e.g. int16 weights' flash)
    chunk: int = 0  # >0: weight tiles [depth/chunk, lanes, chunk] (e.g. indexed sdot), not [lanes, depth]
    even_odd: bool = False  # weight tiles [lanes, 2, depth/2]: even reduction indices, then odd (SXTB16's order)
    pixels: int = 1  # 2: a matrix-multiply kernel over 2 pixels × 2 lanes, accumulating 2×2 blocks (`mmla_desc`)
    min_reduction: int = 0  # layers reducing fewer values per output (KH·KW·C) take another kernel
    # registrar(kernel) registers `intrin` with TVM, idempotent (None: whoever built the kernel registered it)
    registrar: Callable[[DotKernel], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.data_dtype not in ("int8", "uint8"):
            raise ValueError(f"DotKernel.data_dtype must be 'int8' or 'uint8', not {self.data_dtype!r}")
        if self.weight_dtype not in ("int8", "int16"):
            raise ValueError(f"DotKernel.weight_dtype must be 'int8' or 'int16', not {self.weight_dtype!r}")
        if min(self.lanes, self.depth, self.accumulators) < 1:
            raise ValueError("DotKernel lanes, depth and accumulators must be positive")
        if self.chunk < 0 or (self.chunk and self.depth % self.chunk):
            raise ValueError("DotKernel.chunk must be 0 or divide depth")
        if self.even_odd and (self.chunk or self.depth % 2):
            raise ValueError("DotKernel.even_odd needs an even depth and no chunk")
        if self.pixels not in (1, 2) or (self.pixels == 2 and (self.lanes != 2 or self.even_odd
                                                               or self.data_dtype != "int8")):
            raise ValueError("DotKernel.pixels must be 1, or 2 with 2 lanes, int8 data and no even_odd")

    def ensure_registered(self) -> None:
        """Register the kernel's TVM intrinsic unless this process has (before tensorizing with it)."""
        if self.registrar is not None:
            with _REGISTERING:
                self.registrar(self)

    def tile_layout(self, w: np.ndarray) -> np.ndarray:
        """[..., lanes, depth] weight tiles → the intrinsic's layout ([..., depth/chunk, lanes, chunk] or
        [..., lanes, 2, depth/2])."""
        if self.even_odd:
            return np.swapaxes(w.reshape(*w.shape[:-1], self.depth // 2, 2), -1, -2)
        if not self.chunk:
            return w
        return np.moveaxis(w.reshape(*w.shape[:-1], self.depth // self.chunk, self.chunk), -2, -3)

    def weight(self, wp, outer: tuple, lane, r):
        """The packed weight of output lane `lane`, reduction index `r`, in the tile at `outer`."""
        return wp[(*outer, *tile(self.lanes, self.depth, self.chunk, self.even_odd)[1](lane, r % self.depth))]


def tile(lanes: int, depth: int, chunk: int = 0, even_odd: bool = False):
    """(shape, index(lane, k)) of one packed weight tile: ``[lanes, depth]``, ``[depth/chunk, lanes,
    chunk]`` when `chunk` is set, ``[lanes, 2, depth/2]`` with `even_odd` (`DotKernel.tile_layout`)."""
    if even_odd:
        return (lanes, 2, depth // 2), lambda i, k: (i, k % 2, k // 2)
    if chunk:
        return (depth // chunk, lanes, chunk), lambda i, k: (k // chunk, i, k % chunk)
    return (lanes, depth), lambda i, k: (i, k)


def dot_desc(lanes: int, depth: int, weight_dtype: str = "int8", chunk: int = 0, even_odd: bool = False):
    """The TensorIntrin description every dot kernel shares (``C[i] += Σ_k A[k]·B[i, k]``), with B in
    the packed tile layout of `tile`. An intrinsic registers it beside its own implementation."""
    from tvm.script import tirx as T

    shape, at = tile(lanes, depth, chunk, even_odd)
    whole = tuple(slice(0, d) for d in shape)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (depth,), "int8", offset_factor=1)
        B = T.match_buffer(b, shape, weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[whole])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, depth):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[at(vi, vk)], "int32")

    return desc


def mmla_desc(depth: int, chunk: int = 0):
    """The TensorIntrin description of a 2-pixel matrix-multiply kernel (`DotKernel.pixels` = 2, one
    channel pair per call): A holds two pixels' `depth` channels (any row stride), B is a packed 2-lane
    tile as in `dot_desc`, and C is the instruction's 2×2 (pixel, channel) block, ``C[p, i] += Σ_k
    A[p, k]·B[i, k]``."""
    from tvm.script import tirx as T

    shape, at = tile(2, depth, chunk)
    whole = tuple(slice(0, d) for d in shape)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2, depth), "int8", offset_factor=1)
        B = T.match_buffer(b, shape, "int8", offset_factor=1)
        C = T.match_buffer(c, (2, 2), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:depth], B[whole])
            T.writes(C[0:2, 0:2])
            for p, i, k in T.grid(2, 2, depth):
                with T.sblock("update"):
                    vp, vi, vk = T.axis.remap("SSR", [p, i, k])
                    C[vp, vi] = C[vp, vi] + T.cast(A[vp, vk], "int32") * T.cast(B[at(vi, vk)], "int32")

    return desc
