"""Tensor intrinsics of the depthwise int8 conv on aarch64 with dotprod (`int8.legalize_depthwise_dot`).

A depthwise conv reduces over taps, not channels, so the indexed ``sdot`` of the dense kernels (one
activation broadcast against 4 output channels) does not fit it. Here each 32-bit lane is one channel
and its 4 bytes are that channel's 3 vertical taps and the third again (against a zero weight), so one
plain ``sdot`` does 4 channels × 4 taps:

    `TAPS` (``sdot_4x4_lanewise_i8i8s32``):   C[i] += Σ_k int32(A[i, k]) · int32(B[i, k])     i, k < 4

with A a re-laid input column ``[channel, tap]`` and B the packed weights ``[kx, channel, tap]``. The
re-layout from NHWC is `COLUMNS` (``tap_columns_3x16_i8``): three input rows' 16 channels interleaved
into ``[16 channels, 4 taps]`` by one shuffle, which LLVM stores with a single ``st4``:

    P[i, k] = X[min(k, 2), 0, i]        i < 16, k < 4

`register` registers both with TVM when a layer first uses them (as `DotKernel.ensure_registered`).
`padded_columns` builds the re-layout as a kernel of its own, reading the unpadded input (the zero-point
pad written by the same shuffles and stores), for layers whose channels are whole 16-channel calls.
"""
from __future__ import annotations

import threading

from tvm import s_tir
from tvm.script import tirx as T

LANES, TAPS_PER_LANE = 4, 4  # int32 lanes of one sdot, taps each lane reduces
ROWS, CHANNELS = 3, 16  # kernel rows (3×3 windows) and channels one re-layout call covers
TAPS = "sdot_4x4_lanewise_i8i8s32"
COLUMNS = f"tap_columns_{ROWS}x{CHANNELS}_i8"
COLUMNS_ATTR = "graphopt.depthwise_columns"  # function attribute of `padded_columns`' PrimFuncs
_REGISTERING = threading.Lock()


def _taps():
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (LANES, TAPS_PER_LANE), "int8", offset_factor=1)
        B = T.match_buffer(b, (LANES, TAPS_PER_LANE), "int8", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:LANES, 0:TAPS_PER_LANE], B[0:LANES, 0:TAPS_PER_LANE])
            T.writes(C[0:LANES])
            for i, k in T.grid(LANES, TAPS_PER_LANE):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (LANES, TAPS_PER_LANE), "int8", offset_factor=1)
        B = T.match_buffer(b, (LANES, TAPS_PER_LANE), "int8", offset_factor=1)
        C = T.match_buffer(c, (LANES,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:LANES, 0:TAPS_PER_LANE], B[0:LANES, 0:TAPS_PER_LANE])
            T.writes(C[0:LANES])
            C[T.ramp(T.int32(0), 1, LANES)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), C.vload([0], "int32x4"),
                A.vload([0, 0], "int8x16"), B.vload([0, 0], "int8x16"), dtype="int32x4")

    return desc, impl


def _columns():
    @T.prim_func(s_tir=True)
    def desc(x: T.handle, p: T.handle) -> None:
        X = T.match_buffer(x, (ROWS, 1, CHANNELS), "int8", strides=[T.int32(), T.int32(), 1], offset_factor=1)
        P = T.match_buffer(p, (CHANNELS, TAPS_PER_LANE), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(X[0:ROWS, 0:1, 0:CHANNELS])
            T.writes(P[0:CHANNELS, 0:TAPS_PER_LANE])
            for i, k in T.grid(T.int64(CHANNELS), T.int64(TAPS_PER_LANE)):  # int64: Relax's indices
                with T.sblock("columns"):
                    vi, vk = T.axis.remap("SS", [i, k])
                    P[vi, vk] = X[T.min(vk, T.int64(ROWS - 1)), 0, vi]

    @T.prim_func(s_tir=True)
    def impl(x: T.handle, p: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        X = T.match_buffer(x, (ROWS, 1, CHANNELS), "int8", strides=[s0, s1, 1], offset_factor=1)
        P = T.match_buffer(p, (CHANNELS, TAPS_PER_LANE), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(X[0:ROWS, 0:1, 0:CHANNELS])
            T.writes(P[0:CHANNELS, 0:TAPS_PER_LANE])
            P[0, T.ramp(T.int32(0), 1, CHANNELS * TAPS_PER_LANE)] = T.Shuffle(
                [X.vload([min(k, ROWS - 1), 0, 0], "int8x16") for k in range(TAPS_PER_LANE)],
                [k * CHANNELS + i for i in range(CHANNELS) for k in range(TAPS_PER_LANE)])

    return desc, impl


def register() -> None:
    """Register `TAPS` and `COLUMNS` with TVM unless this process has."""
    with _REGISTERING:
        for name, functions in ((TAPS, _taps), (COLUMNS, _columns)):
            if s_tir.TensorIntrin.get(name, allow_missing=True) is None:
                s_tir.TensorIntrin.register(name, *functions())


def padded_columns(shape: tuple[int, int, int, int], rows: int, width: int, stride: int, top: int, left: int,
                   value: int):
    """A PrimFunc ``columns(x, p)`` writing the re-laid input of a depthwise 3×3 conv straight from its
    unpadded NHWC input ``x`` (`shape`; channels a multiple of `CHANNELS`): ``p[n, y, u, c, k] =
    x′[n, y·stride + min(k, 2), u, c]`` for `rows` output rows and `width` padded columns, where ``x′`` is
    ``x`` padded by `top` rows and `left` columns (and whatever more the rows and columns need) with `value`
    (the zero point). Interior columns interleave three row loads with one shuffle (``st4``) — in the rows
    whose window reaches into the padding, loads of a clamped row or the broadcast value —; pad columns
    store the value. Scheduled by hand (parallel over output rows)."""
    from tvm import tirx

    n, h, w, c = shape
    calls, vec = c // CHANNELS, CHANNELS * TAPS_PER_LANE
    interleave = [k * CHANNELS + i for i in range(CHANNELS) for k in range(TAPS_PER_LANE)]

    def tap_row(x, b, y, u, cb, k, border: bool):
        """Row min(k, 2) of output row y's window, columns u, 16 channels from cb·16 (in a `border` row's
        window: loaded from a clamped row, or the pad value)."""
        r = y * stride + min(k, ROWS - 1) - top
        if not border:
            return x[b, r, u, tirx.Ramp(cb * CHANNELS, 1, CHANNELS)]
        load = x[b, tirx.max(tirx.min(r, h - 1), 0), u, tirx.Ramp(cb * CHANNELS, 1, CHANNELS)]
        return tirx.Select(tirx.all(r >= 0, r < h), load, tirx.Broadcast(tirx.const(value, "int8"), CHANNELS))

    def column(x, b, y, u, cb, border: bool):
        return tirx.Shuffle([tap_row(x, b, y, u, cb, k, border) for k in range(TAPS_PER_LANE)], interleave)

    right = width - left - w

    @T.prim_func(private=True, s_tir=True)
    def columns(x: T.Buffer((n, h, w, c), "int8"),  # type: ignore[valid-type]  # TVMScript
                p: T.Buffer((n, rows, width, c, TAPS_PER_LANE), "int8")):  # type: ignore[valid-type]  # TVMScript
        # scheduled here and opaque (op_pattern 8), so FuseOps leaves it whole
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8, COLUMNS_ATTR: True})
        with T.sblock("root"):
            for by in T.parallel(n * rows):
                for u, cb in T.grid(left, calls):
                    p[by // rows, by % rows, u, cb * CHANNELS, T.ramp(0, 1, vec)] = T.broadcast(T.int8(value), vec)
                if (by % rows) * stride - top >= 0 and (by % rows) * stride - top + ROWS <= h:
                    for u, cb in T.grid(w, calls):
                        p[by // rows, by % rows, u + left, cb * CHANNELS, T.ramp(0, 1, vec)] = column(
                            x, by // rows, by % rows, u, cb, False)
                else:
                    for u, cb in T.grid(w, calls):
                        p[by // rows, by % rows, u + left, cb * CHANNELS, T.ramp(0, 1, vec)] = column(
                            x, by // rows, by % rows, u, cb, True)
                for u, cb in T.grid(right, calls):
                    p[by // rows, by % rows, u + left + w, cb * CHANNELS, T.ramp(0, 1, vec)] = T.broadcast(
                        T.int8(value), vec)

    return columns
