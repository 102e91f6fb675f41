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
instructions per output pixel of a 3×3 RGB window. Refuses (`fits` is False) padded or dilated convs,
1-row windows, and window rows wider than one 16-byte vector: those keep the row reduction.
"""
from __future__ import annotations

from tvm.script import tirx as T

PATCHES_ATTR = "graphopt.conv_patches"  # function attribute of `patches`' PrimFuncs
VECTOR = 16  # bytes of the widest window-row copy (one NEON / SSE register)


def fits(kh: int, kw: int, channels: int, padding, dilation) -> bool:
    """Whether a conv's windows can be copied by `patches`: unpadded input (the converters' zero-point pad
    is in the tensor already), dilation 1, more than one kernel row, rows of at most `VECTOR` bytes."""
    return not any(padding) and all(d == 1 for d in dilation) and kh > 1 and kw * channels <= VECTOR


def patches(shape: tuple[int, int, int, int], kh: int, kw: int, strides: tuple[int, int], depth: int):
    """A PrimFunc ``patches(x, p)``: ``x`` int8 NHWC `shape`, ``p`` int8 ``[n, oh, ow, depth]`` holding the
    KH×KW windows (stride `strides`) as above; `depth` ≥ KH·KW·C. Scheduled here (parallel over output rows)
    and opaque, so FuseOps leaves it whole."""
    n, h, w, c = shape
    sh, sw = strides
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    row = kw * c
    tail = depth - kh * row
    # rows copied as one vector of the next power of two ≥ the row: all but the last, when their overrun stays
    # inside the pixel's row of P and inside the next input row
    vector = next(v for v in (4, 8, VECTOR) if v >= row)
    wide = kh - 1 if (kh - 2) * row + vector <= depth and vector - row <= w * c else 0

    def source(by, u, ky):
        return ((by // oh * h + by % oh * sh + ky) * w + u * sw) * c

    def span(start, width: int):  # `width` contiguous bytes from `start` (a ramp needs 2 lanes)
        return T.ramp(start, 1, width) if width > 1 else start

    def zeros(width: int):
        return T.broadcast(T.int8(0), width) if width > 1 else T.int8(0)

    @T.prim_func(private=True, s_tir=True)
    def conv_patches(x: T.Buffer((n, h, w, c), "int8"),  # type: ignore[valid-type]  # TVMScript
                     p: T.Buffer((n, oh, ow, depth), "int8")):  # type: ignore[valid-type]  # TVMScript
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8, PATCHES_ATTR: True})
        xf = T.decl_buffer((n * h * w * c,), "int8", data=x.data)
        pf = T.decl_buffer((n * oh * ow * depth,), "int8", data=p.data)
        with T.sblock("root"):
            for by in T.parallel(n * oh):
                for u in T.serial(ow):
                    for ky in T.unroll(wide):
                        pf[span((by * ow + u) * depth + ky * row, vector)] = xf[span(source(by, u, ky), vector)]
                    for ky in T.unroll(wide, kh):
                        pf[span((by * ow + u) * depth + ky * row, row)] = xf[span(source(by, u, ky), row)]
                    if tail > 0:  # after the copies: a 16-byte one may have run into it
                        pf[span((by * ow + u) * depth + kh * row, tail)] = zeros(tail)

    return conv_patches
