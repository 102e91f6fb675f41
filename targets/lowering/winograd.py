"""Winograd F(m×m, 3×3) legalization of fp32 NHWC/HWIO 3×3 stride-1 convolutions (host x86).

A direct 3×3 conv costs 9 multiplies per output per input channel; F(m, 3) computes an m×m output
tile from an α×α input tile (α = m + 2) with α² multiplies per input channel — 36/16 = 2.25 per
output for F(4, 3), 4× fewer; 16/4 = 4 for F(2, 3), whose transformed weights are 1.8× the conv's
against F(4, 3)'s 4× (`choose_tile` picks m per layer). `legalize_winograd` emits three PrimFuncs:

1. input transform  ``V[p, a, b, c] = (Bᵀ d_p B)[a, b]`` over each tile ``p`` of the (padded) input,
   separably (rows ``d B``, then ``Bᵀ ·``) as sums of B's nonzero constants (`TRANSFORM_ATTR` blocks;
   `schedules.WinogradTransform` unrolls a, b and vectorizes c; FuseOps leaves it alone);
2. a batched GEMM ``M[a, b, p, k] = Σ_c V[p, a, b, c] · U[a, b, c, k]`` whose innermost output axis is
   the output channel, so `schedules.ChannelLastReduction` register-tiles it (U = G g Gᵀ is computed
   in numpy at compile time and packed ``[α, α, K/ft, C, ft]`` as the direct conv's weights are);
3. output transform ``Y_p = Aᵀ M_p A`` per tile, computed in the conv's output coordinates (so tiles
   past the border are cropped); FuseOps fuses the conv's epilogue (bias, residual add, activation)
   into it as into a conv, and `WinogradTransform` applies it per element.

Refuses (returns None, the conv keeps the direct path): anything but fp32 NHWC/HWIO, 3×3, stride 1,
dilation 1, groups 1, a constant weight and static shapes; and layers `choose_tile` declines.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import tvm
from tvm import relax, te, tirx, topi

# Block annotation of the transform computes: for the input transform's two stages, the first of the
# two axes (positions in a tile) whose constants the body selects, which the schedule unrolls; for the
# output transform (in output coordinates), -m: the schedule splits its rows and columns by m.
TRANSFORM_ATTR = "graphopt.winograd_transform"

# Output tile sizes, preferred first: F(4, 3) does 36/64 of F(2, 3)'s GEMM multiplies for a ~3.5× larger
# rounding error (Barabasz et al., arXiv:1803.10986: 3.3e-7 vs 7.7e-8 relative on fp32 conv layers).
TILES = (4, 2)

# relax OpPatternKind values (tvm/relax/op_attr_types.h)
_OUT_ELEMWISE_FUSABLE, _OPAQUE = 4, 8


@cache
def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A [α, m], B [α, α], G [α, 3]) of F(m, 3), float64, from TVM's Cook–Toom construction with
    its error-minimizing interpolation points: ``Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A``."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    a, b, g = _cook_toom_convolution(_interpolation_points(m + 1), m, 3)
    return np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(g, np.float64)


@dataclass(frozen=True)
class WinogradLayer:
    """A conv that took Winograd: its input (N, H, W, C), output channels and tile size."""

    shape: tuple[int, int, int, int]
    out_channels: int
    tile: int

    def describe(self) -> str:
        n, h, w, c = self.shape
        return f"conv3x3 {h}x{w}x{c}->{self.out_channels} F({self.tile},3)"


# Where Winograd was measured to win (docs/benchmarks.md): at least this many input channels (32×32×16:
# F(4, 3) 0.71× the direct conv per kernel; fewer were not measured) …
MIN_CHANNELS = 16
# … and output pixels …
MIN_PIXELS = 64
# … and tiles (over the batch) re-using the transformed weights, α²/9 = 4× the direct conv's for F(4, 3):
# 14×14×256 (16 tiles) ran 0.50×, 7×7×512 (4 tiles, 38 MB of weights) 1.6× per kernel. F(4, 3) on 8×8×64
# (4 tiles) ran 0.34× alone but lost in ResNet-20 end to end; F(2, 3) there (16 tiles, 262 KB of weights
# per conv) made ResNet-20 fp32 0.93× (1 thread, back to back; 0.95× with caches flushed between calls).
MIN_TILES = 16
# … or, when the transformed weights do not fit one core's L2 and stream from L3 or memory on every call,
# this many: ResNet-18's 14×14×256 (F(4, 3): 16 tiles over 9.4 MB per conv) made the model 0.93× with
# F(2, 3) instead (49 tiles over 4.2 MB; 2 threads, paired), while its 28×28×128 keeps F(4, 3) (49 tiles
# over 2.4 MB: F(2, 3) there measured 1.04×). 16×16×32 (16 tiles, 147 KB) keeps F(4, 3) in L2 (F(2, 3)
# measured 1.08× end to end on ResNet-20).
STREAMED_TILES = 32


def choose_tile(batch: int, out_h: int, out_w: int, in_channels: int, out_channels: int,
                l2_bytes: int | None) -> int | None:
    """The output tile m of the Winograd F(m, 3) that should replace this layer's direct conv (the
    constants above), or None to keep the direct conv. `l2_bytes`: one core's L2 (None: unknown, the
    weights are taken to fit)."""
    if in_channels < MIN_CHANNELS or out_h * out_w < MIN_PIXELS:
        return None
    for m in TILES:
        tiles = batch * -(-out_h // m) * -(-out_w // m)
        weights = (m + 2) ** 2 * in_channels * out_channels * 4
        if tiles >= (MIN_TILES if l2_bytes is None or weights <= l2_bytes else STREAMED_TILES):
            return m
    return None


def _static(shape) -> list[int] | None:
    if shape is None or not all(isinstance(d, (int, tirx.IntImm)) for d in shape):
        return None
    return [int(d) for d in shape]


def _combination(coeffs: list[tuple[float, tirx.PrimExpr]]) -> tirx.PrimExpr:
    """Σ c·x over the nonzero c, with ±1 as adds/subtracts."""
    total = None
    for c, x in coeffs:
        if c == 0:
            continue
        term = x if c == 1 else -x if c == -1 else tirx.const(float(c), "float32") * x
        total = term if total is None else total + term
    return total if total is not None else tirx.const(0.0, "float32")


def _select(index, cases: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """cases[index] as a chain of ``if_then_else`` on a loop variable the schedule unrolls, so each
    unrolled copy keeps one case. Not ``Select``: TVM simplifies every case of a select in every copy
    before dropping the others (a ResNet-18 transform kernel built in 0.44 s instead of 0.08 s)."""
    expr = cases[-1]
    for i in range(len(cases) - 2, -1, -1):
        expr = tirx.if_then_else(index == i, cases[i], expr)
    return expr


def _input_transform(data, m: int, pad_top: int, pad_left: int, tiles_h: int, tiles_w: int):
    """V = Bᵀ d B per tile, separably: rows ``T = d B``, then ``V = Bᵀ T``."""
    _, b, _ = matrices(m)
    alpha = m + 2
    n, height, width, c = (int(d) for d in data.shape)
    padded = topi.nn.pad(data, [0, pad_top, pad_left, 0],
                         [0, tiles_h * m + 2 - height - pad_top, tiles_w * m + 2 - width - pad_left, 0],
                         name="winograd_pad")
    per_image = tiles_h * tiles_w

    def rows(p, i, j, ch):  # (d B)[i, j] = Σ_s d[i, s] B[s, j]
        img, t = p // per_image, p % per_image
        y, x0 = t // tiles_w * m + i, t % tiles_w * m
        return _select(j, [_combination([(b[s, col], padded[img, y, x0 + s, ch]) for s in range(alpha)])
                           for col in range(alpha)])

    t = te.compute((n * per_image, alpha, alpha, c), rows, name="winograd_input_rows", attrs={TRANSFORM_ATTR: 1})
    # tile-major, so a tile's α² vectors are stored contiguously (position-major put them a power of two
    # apart on 32×32×16: 4 KiB, one L1 set, 3× slower)
    return te.compute((n * per_image, alpha, alpha, c),  # (Bᵀ T)[i, j] = Σ_r B[r, i] T[r, j]
                      lambda p, i, j, ch: _select(i, [_combination([(b[r, row], t[p, r, j, ch]) for r in range(alpha)])
                                                      for row in range(alpha)]),
                      name="winograd_input", attrs={TRANSFORM_ATTR: 1})


def _gemm(v, u_packed):
    tiles, alpha, _, c = (int(d) for d in v.shape)
    _, _, k_outer, _, k_tile = (int(d) for d in u_packed.shape)
    rc = te.reduce_axis((0, c), "rc")
    return te.compute((alpha, alpha, tiles, k_outer * k_tile),
                      lambda a, b, p, k: te.sum(v[p, a, b, rc] * u_packed[a, b, k // k_tile, rc, k % k_tile], axis=rc),
                      name="winograd_gemm")


def _output_transform(mm, m: int, n: int, out_h: int, out_w: int, tiles_h: int, tiles_w: int):
    """Y = Aᵀ M A per tile, computed in output coordinates (y, x) so the conv's epilogue applies
    elementwise; the schedule splits y and x by m and unrolls the positions in a tile."""
    a, _, _ = matrices(m)
    alpha = m + 2
    k = int(mm.shape[-1])
    per_image = tiles_h * tiles_w

    def body(img, y, x, ch):
        p = img * per_image + y // m * tiles_w + x // m

        def case(i, j):  # (Aᵀ M A)[i, j] = Σ_r Σ_s A[r, i] A[s, j] M[r, s]
            return _combination([(a[r, i] * a[s, j], mm[r, s, p, ch])
                                 for r in range(alpha) if a[r, i] for s in range(alpha) if a[s, j]])

        return _select(y % m, [_select(x % m, [case(i, j) for j in range(m)]) for i in range(m)])

    return te.compute((n, out_h, out_w, k), body, name="winograd_output", attrs={TRANSFORM_ATTR: -m})


def legalize_winograd(bb: relax.BlockBuilder, call: relax.Call, k_tile, taken: list[WinogradLayer] | None = None,
                      l2_bytes: int | None = None):
    """The conv `call` as Winograd F(m, 3) stages (see the module docstring), or None when it does not
    apply. `k_tile(K)`: the output-channel tile the GEMM's weights are packed for; `l2_bytes`: one core's
    L2 (`choose_tile`); a conv that takes Winograd is appended to `taken`."""
    attrs = call.attrs
    data, weight = call.args
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC") \
            or not isinstance(weight, tvm.ir.expr.Constant) or int(attrs.groups) != 1 \
            or [int(s) for s in attrs.strides] != [1, 1] or [int(d) for d in attrs.dilation] != [1, 1] \
            or str(data.ty.dtype) != "float32" or str(weight.ty.dtype) != "float32" \
            or str(attrs.out_dtype) not in ("", "float32"):
        return None
    shape, wshape = _static(data.ty.shape), _static(weight.ty.shape)
    if shape is None or wshape is None or wshape[:2] != [3, 3] or wshape[2] != shape[3]:
        return None
    n, height, width, c = shape
    f = wshape[3]
    pt, pl, pb, pr = (int(v) for v in attrs.padding)
    out_h, out_w = height + pt + pb - 2, width + pl + pr - 2
    m = choose_tile(n, out_h, out_w, c, f, l2_bytes) if out_h >= 1 and out_w >= 1 else None
    if m is None:
        return None
    _, _, g = matrices(m)
    alpha = m + 2
    u = np.einsum("ai,ijck,bj->abck", g, weight.value.numpy().astype(np.float64), g)  # G g Gᵀ per (c, k)
    ft = k_tile(f)
    u_packed = np.ascontiguousarray(u.reshape(alpha, alpha, c, f // ft, ft).transpose(0, 1, 3, 2, 4)).astype(np.float32)
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    if taken is not None:
        taken.append(WinogradLayer((n, height, width, c), f, m))
    # FuseOps patterns: the input transform stays alone (injective, it would join the previous conv's
    # output transform in one PrimFunc no rule schedules well); the output transform takes the conv's
    # elementwise epilogue, as a conv does
    v = bb.emit(bb.call_te(_input_transform, data, m, pt, pl, tiles_h, tiles_w,
                           primfunc_name_hint="winograd_input_transform", primfunc_attrs={"op_pattern": _OPAQUE}))
    mm = bb.emit(bb.call_te(_gemm, v, relax.const(u_packed), primfunc_name_hint="winograd_gemm"))
    return bb.call_te(_output_transform, mm, m, n, out_h, out_w, tiles_h, tiles_w,
                      primfunc_name_hint="winograd_output_transform",
                      primfunc_attrs={"op_pattern": _OUT_ELEMWISE_FUSABLE})
