"""im2col for few-channel int8 convs: each output pixel's whole window as one contiguous row.

A KH×KW conv over C channels reduces KH·KW·C values per output. `int8.legalize_conv2d` otherwise reduces
each kernel row's KW·C contiguous NHWC values padded to a whole kernel depth, KH times: a 3×3 RGB stem
reduces 3 × 16 = 48 values on arm-a55's 16-deep ``sdot`` kernel and arm-a53's NEON one for its 27 taps.
`patches` writes the window rows of every output pixel one after another,

    P[n, y, x, (ky·KW + kx)·C + c] = X[n, y·sh + ky, x·sw + kx, c]        (0 in the last K′ − KH·KW·C values)

so the conv becomes a 1×1 conv over P reducing K′ = KH·KW·C padded once (32 values for that stem). Each
window row is KW·C contiguous bytes: the kernel copies all but the last with one 4-, 8- or 16-byte load and
store each (the bytes past the row land where the next row's copy or the zeroed tail overwrites them; the
load stays inside the next input row, which exists), the last with exact-width ones: ~11 aarch64
instructions per output pixel of a 3×3 RGB window. A grouped conv's windows are copied per group, each
tap's C/groups channels a piece, into a row of its own: ``P[n, y, x, g·K′ + (ky·KW + kx)·C/groups + c]``
(`int8.legalize_grouped_patches`: a grouped 1×1 conv over P). Refuses (`fits` is False) padded or dilated
convs, 1-row windows (grouped: 1 tap), and pieces wider than one 16-byte vector: those keep their kernels.
"""
from __future__ import annotations

from tvm.script import tirx as T

from graphopt.targets.lowering.prim_funcs import span, splat

PATCHES_ATTR = "graphopt.conv_patches"  # function attribute of `patches`' PrimFuncs
VECTOR = 16  # bytes of the widest window-row copy (one NEON / SSE register)


def fits(kh: int, kw: int, channels: int, padding, dilation, groups: int = 1) -> bool:
    """Whether a conv's windows can be copied by `patches`: unpadded input (the converters' zero-point pad
    is in the tensor already), dilation 1, more than one kernel row (grouped: more than one tap), and
    copied pieces — window rows, or a group's channels at one tap — of at most `VECTOR` bytes."""
    piece = kw * channels if groups == 1 else channels // groups
    return not any(padding) and all(d == 1 for d in dilation) and (kh if groups == 1 else kh * kw) > 1 \
        and piece <= VECTOR


def patches(shape: tuple[int, int, int, int], kh: int, kw: int, strides: tuple[int, int], depth: int,
            groups: int = 1):
    """A PrimFunc ``patches(x, p)``: ``x`` int8 NHWC `shape`, ``p`` int8 ``[n, oh, ow, groups · depth]``
    holding the KH×KW windows (stride `strides`) as above, each group's channels in a `depth`-value row of
    its own (`depth` ≥ KH·KW·C/groups). Scheduled here (parallel over output rows) and opaque, so FuseOps
    leaves it whole."""
    n, h, w, c = shape
    sh, sw = strides
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    # copied pieces: window rows (KW·C contiguous bytes), or in a grouped conv each tap's C/groups channels
    pieces, piece = (kh, kw * c) if groups == 1 else (kh * kw, c // groups)
    tail = depth - pieces * piece
    # pieces copied as one vector of the next power of two ≥ the piece: all but the last, when their overrun
    # stays inside the group's row of P and inside the input (the next row, or the next tap's channels)
    vector = next(v for v in (4, 8, VECTOR) if v >= piece)
    wide = pieces - 1 if (pieces - 2) * piece + vector <= depth \
        and vector - piece <= (w * c if groups == 1 else c) else 0

    def source(by, u, t, g):
        if groups == 1:
            return ((by // oh * h + by % oh * sh + t) * w + u * sw) * c
        return ((by // oh * h + by % oh * sh + t // kw) * w + u * sw + t % kw) * c + g * piece

    def target(by, u, t, g):
        return ((by * ow + u) * groups + g) * depth + t * piece

    @T.prim_func(private=True, s_tir=True)
    def conv_patches(x: T.Buffer((n, h, w, c), "int8"),  # type: ignore[valid-type]  # TVMScript
                     p: T.Buffer((n, oh, ow, groups * depth), "int8")):  # type: ignore[valid-type]  # TVMScript
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8, PATCHES_ATTR: True})
        xf = T.decl_buffer((n * h * w * c,), "int8", data=x.data)
        pf = T.decl_buffer((n * oh * ow * groups * depth,), "int8", data=p.data)
        with T.sblock("root"):
            for by in T.parallel(n * oh):
                for u, g in T.grid(ow, groups):
                    for t in T.unroll(wide):
                        pf[span(target(by, u, t, g), vector)] = xf[span(source(by, u, t, g), vector)]
                    for t in T.unroll(wide, pieces):
                        pf[span(target(by, u, t, g), piece)] = xf[span(source(by, u, t, g), piece)]
                    if tail > 0:  # after the copies: a vector one may have run into it
                        pf[span(target(by, u, pieces, g), tail)] = splat(0, tail)

    return conv_patches
