"""Tensorized int8 conv2d and dense: weights packed at compile time for a CPU's dot-product instruction.

A `graphopt.targets.lowering.dot.DotKernel` names a registered TVM tensor intrinsic — AVX-512 VNNI
``vpdpbusd`` (16×4, unsigned activations), aarch64 ``sdot``, NEON widening multiply-accumulate,
Cortex-M ``SMLAD`` — and the target feature that enables it; `graphopt.targets.lowering.kernels`
lists them and picks those the target has (data, never target names); `choose` takes one per layer.
A kernel with ``pixels=2`` (aarch64 i8mm ``smmla``) computes a 2-pixel × 2-channel block,
``C[p, i] += Σ_k A[p, k] · B[i, k]`` (`dot.mmla_desc`): its conv/dense computes accumulate in such
blocks along the output's last pixel axis (an odd count computes one padding pixel) and `_finish`
reads them back in the output's layout; layers with one pixel per row take a 1-pixel kernel.

`legalize_conv2d` / `legalize_matmul` replace LegalizeOps for int8 × int8 → int32 ``conv2d``
(NHWC/HWIO, any stride/dilation, not grouped) and ``matmul`` against a constant weight: the weight
is packed in numpy to ``[F/lanes, KH, KW, C/depth, lanes, depth]`` (dense: ``[N/lanes, K/depth,
lanes, depth]``; kernels with a `chunk` order each tile ``[depth/chunk, lanes, chunk]``, `even_odd`
ones ``[lanes, 2, depth/2]``), zero-padded to whole tiles — the layout the intrinsic reads with one
vector load; few-channel convs (e.g. a 3-channel stem) instead reduce over each kernel row's KW·C
contiguous NHWC values, padded once to whole `depth` groups (`reduction`), or on NEON over their whole
window, which `patches` copies into one row per output pixel (a 1×1 conv over the copy);
auto-tensorizing unpacked weights is silently wrong in TVM 0.27. Unsigned-activation kernels see
``x + 128`` and subtract ``128·Σw`` in the epilogue. `schedules.TensorizedDot` schedules the result.

Weight storage: where a target has kernels for int8 and for wider (int16) weights, `choose`
follows the active `WeightStorage` (set with `weight_storage`, from ``compile(optimize_for=...)``):
every layer legalized records its storage and why (`weight_storage` yields the list).

Declines (returns None, the generic int8 path runs): grouped/depthwise conv, non-constant weights, targets
without a dot kernel. An int8 depthwise conv with all-one weights (graphopt's sum pooling) becomes a
weightless window sum instead; grouped convs whose groups' output channels are whole kernel lanes take
`legalize_grouped_dot` (a dense dot kernel per group) on targets with an int8 dot instruction; other grouped
and depthwise convs with few taps × channels per group take `legalize_grouped_conv2d` (int16 pair products
vectorized over output channels, scheduled by `schedules.GroupedInt8`) on NEON targets — except depthwise 3×3
convs on aarch64 with dotprod, which take `legalize_depthwise_dot` (4 vertical taps per 32-bit lane of a plain
``sdot``, `intrin_depthwise`, scheduled by `schedules.DepthwiseDot`). On scalar Cortex-M DSP targets depthwise
convs take `legalize_depthwise_dsp` (4 channels per tap: ``SXTB16`` and ``SMLABB``/``SMLATT``,
`intrin_dsp_depthwise`, scheduled by `schedules.DepthwiseDsp`) and grouped ones `legalize_grouped_dot`.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx, topi

from graphopt.config import OptimizeFor
from graphopt.targets.lowering import patches
from graphopt.targets.lowering.dot import DOT_ATTR, DotKernel


@dataclass(frozen=True)
class WeightStorage:
    """The weight-storage policy of one build: `OptimizeFor`, and the layers (by `layer_key`) that keep
    int8 weights because the board's flash cannot hold them wider."""

    optimize_for: OptimizeFor = OptimizeFor.BALANCED
    narrow: frozenset = frozenset()


_STORAGE: contextvars.ContextVar = contextvars.ContextVar("graphopt_weight_storage", default=None)


@contextlib.contextmanager
def weight_storage(policy: WeightStorage):
    """Within, `choose` follows `policy`; yields the list the legalizations append their decisions to
    (``{"layer", "key", "packed_key", "weights", "macs", "kernel", "storage", "reason", "wide_extra_bytes"}``)."""
    decisions: list[dict] = []
    token = _STORAGE.set((policy, decisions))
    try:
        yield decisions
    finally:
        _STORAGE.reset(token)


def recorded_decisions() -> list[dict]:
    """The decisions recorded so far under the innermost `weight_storage` (empty outside one)."""
    active = _STORAGE.get()
    return [] if active is None else list(active[1])


def summarize_storage(decisions: list[dict]) -> dict:
    """The report's view of a build's weight-storage decisions."""
    return {"layers": [{k: d[k] for k in ("layer", "weights", "kernel", "storage", "reason")} for d in decisions],
            "int16_layers": sum(d["storage"] == "int16" for d in decisions),
            "int8_layers": sum(d["storage"] == "int8" for d in decisions)}


def active_storage() -> WeightStorage:
    """The policy `weight_storage` set (the default one outside)."""
    active = _STORAGE.get()
    return WeightStorage() if active is None else active[0]


def layer_key(weights: np.ndarray) -> str:
    """A layer's identity across builds: a digest of its (constant) weights."""
    digest = hashlib.sha1(f"{weights.dtype}{weights.shape}".encode() + np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()[:16]


def _wide(k: DotKernel) -> bool:
    return k.weight_dtype != "int8"


def _allowed(k: DotKernel, weights: np.ndarray, policy: WeightStorage) -> bool:
    """Whether `k` may take a layer of these weights: their range fits it and `policy` allows its storage."""
    if int(weights.min(initial=0)) < k.min_weight:
        return False
    if not _wide(k):
        return True
    if policy.optimize_for is OptimizeFor.SIZE or layer_key(weights) in policy.narrow:
        return False
    return policy.optimize_for is OptimizeFor.SPEED or k.max_weights is None or weights.size <= k.max_weights


def _storage_reason(kernels, weights: np.ndarray, chosen: DotKernel, policy: WeightStorage) -> str:
    """Why `chosen` stores this layer's weights as it does."""
    wide = [k for k in kernels if _wide(k) and int(weights.min(initial=0)) >= k.min_weight]
    if _wide(chosen):
        return "faster: the kernel multiplies ready int16 pairs"
    if not wide:
        return "the target's kernels for these weights take int8"
    if policy.optimize_for is OptimizeFor.SIZE:
        return "optimize_for=size"
    if layer_key(weights) in policy.narrow:
        return "the board's flash cannot hold it as int16"
    cap = min((k.max_weights for k in wide if k.max_weights is not None), default=None)
    if policy.optimize_for is OptimizeFor.BALANCED and cap is not None and weights.size > cap:
        return f"{weights.size:,} weights > {cap:,} (optimize_for=balanced)"
    return "less padding"


def _record(kernels, w: np.ndarray, packed: np.ndarray, k: DotKernel, layer: str, macs: int) -> None:
    """Append this layer's storage decision to the active `weight_storage` list, if any."""
    active = _STORAGE.get()
    if active is None:
        return
    policy, decisions = active
    decisions.append({"layer": layer, "key": layer_key(w), "packed_key": layer_key(packed), "weights": int(w.size),
                      "macs": int(macs), "kernel": k.intrin, "storage": k.weight_dtype,
                      "reason": _storage_reason(kernels, w, k, policy),
                      "wide_extra_bytes": int(packed.nbytes // 2) if _wide(k) else 0})


# Where the least padding is a narrow kernel's (depth < WIDE_DEPTH), `choose` takes the first kernel (in
# preference order) whose padded reduction is at most PAD_TOLERANCE × the least
PAD_TOLERANCE, WIDE_DEPTH = 4 / 3, 16


def choose(kernels, weights: np.ndarray, channels: int, window: int = 1, pixels: int = 1) -> DotKernel | None:
    """The kernel for one layer: among those whose weight range fits and whose weight storage the
    active `WeightStorage` allows, the first padding least — or, where that is a narrow kernel, the first
    (preferred) whose padded reduction is within `PAD_TOLERANCE` of it (e.g. a 3-channel stem conv); None
    when even the least padding would double the reduction. `window` > 1
    (a conv's kernel width, dilation 1) lets a kernel reduce over the window's `window`·`channels`
    contiguous values instead of over channels (`reduction`). Multi-pixel kernels (`DotKernel.pixels`) need a
    layer with at least that many `pixels` along the row they tile (an odd count computes one padding pixel).
    `weights` is HWIO or [K, N]: each output reduces ``weights.size / N`` values (`DotKernel.min_reduction`)."""
    policy = active_storage()
    per_output = weights.size // max(1, weights.shape[-1])
    fit = [k for k in kernels if _allowed(k, weights, policy) and k.pixels <= pixels and per_output >= k.min_reduction]
    best = min(fit, key=lambda k: reduction(k, channels, window)[0], default=None)
    if best is None:
        return None
    least = reduction(best, channels, window)[0]
    if least >= 2 * window * channels:
        return None  # e.g. a 1-channel dense input: the generic kernel does a quarter of the MACs
    if best.depth < WIDE_DEPTH:  # a 4-deep kernel costs several times a wide one per reduced value: a wide one
        # padding a little more still wins (a 24-channel 1×1 conv on arm-a53: NEON 4×32 over 32 values, not
        # TVM's 4×4 over 24 at 4× the instructions)
        best = next(k for k in fit if reduction(k, channels, window)[0] <= PAD_TOLERANCE * least)
    return best


def reduction(k: DotKernel, channels: int, window: int = 1) -> tuple[int, bool]:
    """(reduced values per kernel row, flattened): `window` × channels padded to whole `depth` groups,
    or — when fewer — the row's window·channels values (contiguous in NHWC) padded once (flattened;
    e.g. a 1-channel 3×3 conv reduces 4 values per row instead of 12). Multi-pixel kernels reduce by channel:
    their two pixels' rows must not overlap."""
    by_channel, flat = window * _ceil(channels, k.depth), _ceil(window * channels, k.depth)
    return (flat, True) if flat < by_channel and k.pixels == 1 else (by_channel, False)


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def _static(shape) -> list[int] | None:
    if shape is None or any(not isinstance(d, tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def _int8_conv_weight(call: relax.Call) -> np.ndarray | None:
    """The HWIO weight of an int8 × int8 → int32 NHWC/HWIO conv2d with a constant weight and a static input
    shape (what every legalization here takes), else None."""
    attrs = call.attrs
    data, weight = call.args
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC") \
            or not isinstance(weight, tvm.ir.expr.Constant) or str(data.ty.dtype) != "int8" \
            or str(weight.ty.dtype) != "int8" or str(attrs.out_dtype) != "int32" or _static(data.ty.shape) is None:
        return None
    return weight.value.numpy()


def _pack_conv_weight(w: np.ndarray, k: DotKernel) -> np.ndarray:
    """HWIO [KH, KW, C, F] → [F/lanes, KH, KW, C/depth, lanes, depth] (tiles in `DotKernel.tile_layout`),
    zero-padded to whole tiles."""
    kh, kw, c, f = w.shape
    cp, fp = _ceil(c, k.depth), _ceil(f, k.lanes)
    w = np.pad(w, [(0, 0), (0, 0), (0, cp - c), (0, fp - f)])
    w = w.reshape(kh, kw, cp // k.depth, k.depth, fp // k.lanes, k.lanes)
    return np.ascontiguousarray(k.tile_layout(w.transpose(4, 0, 1, 2, 5, 3))).astype(k.weight_dtype)


def _pack_dense_weight(w: np.ndarray, k: DotKernel) -> np.ndarray:
    """[K, N] → [N/lanes, K/depth, lanes, depth] (tiles in `DotKernel.tile_layout`), zero-padded to whole tiles."""
    kk, n = w.shape
    kp, np_ = _ceil(kk, k.depth), _ceil(n, k.lanes)
    w = np.pad(w, [(0, kp - kk), (0, np_ - n)]).reshape(kp // k.depth, k.depth, np_ // k.lanes, k.lanes)
    return np.ascontiguousarray(k.tile_layout(w.transpose(2, 0, 3, 1))).astype(k.weight_dtype)


def _prepare_data(data, channels: int, k: DotKernel):
    """Channels zero-padded to whole `depth` groups; +128 as uint8 for unsigned-activation kernels."""
    c = int(data.shape[-1])
    if channels != c:
        data = topi.nn.pad(data, [0] * len(data.shape), [0] * (len(data.shape) - 1) + [channels - c],
                           name="channel_pad")
    if k.data_dtype == "uint8":
        src = data
        data = te.compute(src.shape, lambda *i: _as_data(src[i], k), name="data_u8")
    return data


def _as_data(value, k: DotKernel):
    """An int8 activation as the kernel reads it: itself, or + 128 as uint8."""
    return (value.astype("int32") + 128).astype("uint8") if k.data_dtype == "uint8" else value


def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call, kernels: tuple[DotKernel, ...], pad_value: int = 0,
                    im2col: bool = False):
    """int8 NHWC/HWIO conv2d with a constant weight as a tensorizable packed-weight kernel, or None.
    Its spatial padding reads `pad_value` (an activation's zero point: `fuse_input_pads`). With `im2col`
    (`schedules.CpuParams.im2col`), a few-channel conv whose whole window padded once
    reduces fewer values than its rows padded each (`reduction`; a 3×3 RGB stem: 32 against 48), or that no
    row kernel takes (1 channel: the generic kernel), reads its windows from a
    `graphopt.targets.lowering.patches` copy of its input as a 1×1 conv."""
    attrs = call.attrs
    data = call.args[0]
    if (window_sum := _legalize_window_sum(bb, call, pad_value)) is not None:
        return window_sum
    w = _int8_conv_weight(call)
    if w is None or int(attrs.groups) != 1:
        return None
    kh, kw, c, f = w.shape
    strides, dilation = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
    padding = [int(v) for v in attrs.padding]
    out_shape = [int(d) for d in call.ty.shape]
    layer, macs = f"conv2d {kh}x{kw} {c}->{f}", int(np.prod(out_shape[:-1])) * kh * kw * c * f
    if im2col and (copied := _patched_conv(bb, data, w, strides, padding, dilation, out_shape, kernels, layer,
                                            macs)) is not None:
        return copied
    return _dot_conv(bb, data, w, strides, padding, dilation, out_shape, kernels, pad_value, layer, macs)


def _window(kw: int, channels: int, dilation) -> int:
    # rows of 1-channel convs stay on the generic kernel: cortex-m4's plain_cnn stem measured 530k
    # instructions reducing 4-value rows (one zero tap) against 385k generic
    return kw if dilation[1] == 1 and channels > 1 else 1


def _patched_conv(bb, data, w: np.ndarray, strides, padding, dilation, out_shape, kernels, layer: str, macs: int):
    """The conv as a 1×1 conv over `patches.patches` of its input (`legalize_conv2d`), or None where that
    would not reduce fewer values per output."""
    kh, kw, c, f = w.shape
    if not patches.fits(kh, kw, c, padding, dilation):
        return None
    window, taps = _window(kw, c, dilation), kh * kw * c
    rows = choose(kernels, w, c, window, pixels=out_shape[2])
    k = choose(kernels, w.reshape(1, 1, taps, f), taps, pixels=out_shape[2])
    if k is None or rows is not None and _ceil(taps, k.depth) >= kh * reduction(rows, c, window)[0]:
        return None  # (without a row kernel, e.g. 1 channel, the conv would take the generic int8 kernel)
    copied, flat = _window_copy(bb, data, w, strides, _ceil(taps, k.depth), out_shape)
    return _dot_conv(bb, copied, flat, [1, 1], [0, 0, 0, 0], [1, 1], out_shape, kernels, 0, layer, macs)


def _window_copy(bb, data, w: np.ndarray, strides, depth: int, out_shape, groups: int = 1):
    """(`patches.patches` of `data` with `depth` values per group's window, emitted; the HWIO weight `w` as
    the 1×1 conv over it reads it: [1, 1, depth, F], each group's KH·KW·C/groups taps then zero rows)."""
    kh, kw, g_in, f = w.shape
    n, h, wd, c = (int(d) for d in data.ty.shape)
    gv = bb.add_func(patches.patches((n, h, wd, c), kh, kw, (strides[0], strides[1]), depth, groups),
                     "conv_patches")
    copied = bb.emit(relax.call_tir(gv, [data], relax.TensorType((*out_shape[:-1], groups * depth), "int8")))
    taps = kh * kw * g_in
    return copied, np.pad(w.reshape(1, 1, taps, f), [(0, 0), (0, 0), (0, depth - taps), (0, 0)])


def _dot_conv(bb, data, w: np.ndarray, strides, padding, dilation, out_shape, kernels, pad_value: int, layer: str,
              macs: int):
    """`legalize_conv2d`'s kernel for HWIO weights `w`, or None when no kernel fits them."""
    kh, kw, c, f = w.shape
    window = _window(kw, c, dilation)
    k = choose(kernels, w, c, window, pixels=out_shape[2])
    if k is None:
        return None
    flat = reduction(k, c, window)[1]
    packed = _pack_conv_weight(w.reshape(kh, 1, kw * c, f) if flat else w, k)
    _record(kernels, w, packed, k, layer, macs)
    correction = (128 * w.astype(np.int64).sum(axis=(0, 1, 2))).astype(np.int32) \
        if k.data_dtype == "uint8" else None
    if k.pixels > 1:
        return _emit(bb, _paired_conv(k, packed, f, padding, strides, dilation, pad_value), data, packed, correction,
                     "conv2d_int8")

    def compute(x, wp, *corr):
        pt, pl, pb, pr = padding
        if any(padding):
            x = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr, 0], pad_value=pad_value, name="pad_temp")
        n, h, wd, _ = (int(d) for d in x.shape)
        (sh, sw), (dh, dw) = strides, dilation
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
        ry = te.reduce_axis((0, kh), "ry")
        r = te.reduce_axis((0, packed.shape[3] * k.depth), "r")
        if flat:  # rows as [n, h, w·c] (+ columns the padded reduction reads past the last window: weight 0)
            extra = -(-max(0, (ow - 1) * sw * c + packed.shape[3] * k.depth - wd * c) // c)
            if extra:
                x = topi.nn.pad(x, [0, 0, 0, 0], [0, 0, extra, 0], name="window_pad")
            src = x
            xd = te.compute((n, h, (wd + extra) * c), lambda b, y, j: _as_data(src[b, y, j // c, j % c], k),
                            name="rows")
            column, axes = 0, [ry, r]

            def tap(b, y, xx):
                return xd[b, y * sh + ry * dh, xx * sw * c + r]
        else:
            xd = _prepare_data(x, packed.shape[3] * k.depth, k)
            rx = te.reduce_axis((0, kw), "rx")
            column, axes = rx, [ry, rx, r]

            def tap(b, y, xx):
                return xd[b, y * sh + ry * dh, xx * sw + rx * dw, r]
        acc = te.compute(
            (n, oh, ow, packed.shape[0] * k.lanes),
            lambda b, y, xx, ff: te.sum(
                tap(b, y, xx).astype("int32")
                * k.weight(wp, (ff // k.lanes, ry, column, r // k.depth), ff % k.lanes, r).astype("int32"),
                axis=axes),
            name="conv2d_int8_dot", attrs={DOT_ATTR: k.intrin})
        return _finish(acc, f, corr)

    return _emit(bb, compute, data, packed, correction, "conv2d_int8")


def _paired_conv(k: DotKernel, packed: np.ndarray, channels: int, padding, strides, dilation, pad_value: int = 0):
    """The conv compute of a 2-pixel kernel: the padded input viewed as ``[n, h, sw, w/sw, c]`` (output
    pixels 2j and 2j+1 then read rows one step apart in the fourth axis, for any stride), accumulated in
    the kernel's 2×2 blocks ``[n, oh, ⌈ow/2⌉, F/2, 2, 2]``; an odd width computes one padding
    pixel per row, dropped with the padding channels by `_finish`."""
    _, kh, kw, cg = packed.shape[:4]
    (sh, sw), (dh, dw) = strides, dilation

    def compute(x, wp, *corr):
        pt, pl, pb, pr = padding
        n, h, wd, c = (int(d) for d in x.shape)
        h, wd = h + pt + pb, wd + pl + pr
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
        pairs = -(-ow // 2)
        width = _ceil(max(wd, (2 * pairs - 1) * sw + (kw - 1) * dw + 1), sw)
        x = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr + width - wd, cg * k.depth - c], pad_value=pad_value,
                        name="pad_temp")  # the extra pixels and channels meet zero weights or are dropped
        src = x
        xv = te.compute((n, h, sw, width // sw, cg * k.depth), lambda b, y, s, u, ch: src[b, y, u * sw + s, ch],
                        name="pixel_pairs")
        ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
        r = te.reduce_axis((0, cg * k.depth), "r")
        acc = te.compute(
            (n, oh, pairs, packed.shape[0], 2, 2),
            lambda b, y, xo, ft, p, i: te.sum(
                xv[b, y * sh + ry * dh, rx * dw % sw, xo * 2 + p + rx * dw // sw, r].astype("int32")
                * k.weight(wp, (ft, ry, rx, r // k.depth), i, r).astype("int32"), axis=[ry, rx, r]),
            name="conv2d_int8_dot", attrs={DOT_ATTR: k.intrin})
        return _finish(acc, channels, corr, k, (n, oh, ow), lambda b, y, xx: ((b, y), xx))

    return compute


def _legalize_window_sum(bb: relax.BlockBuilder, call: relax.Call, pad_value: int = 0):
    """An int8 NHWC depthwise conv whose constant weights are all ones (graphopt's sum pooling, e.g. a
    quantized global average pool) as a window sum: no weights in flash, no multiplies; or None."""
    attrs = call.attrs
    data, weight = call.args
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC") \
            or not isinstance(weight, tvm.ir.expr.Constant) or str(data.ty.dtype) != "int8" \
            or str(attrs.out_dtype) != "int32" or _static(data.ty.shape) is None:
        return None
    w = weight.value.numpy()
    kh, kw, one, c = w.shape
    if one != 1 or int(attrs.groups) != c or int(data.ty.shape[-1]) != c or not (w == 1).all():
        return None
    (sh, sw), (dh, dw) = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
    pt, pl, pb, pr = (int(v) for v in attrs.padding)

    def compute(x):
        if pt or pl or pb or pr:
            x = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr, 0], pad_value=pad_value, name="pad_temp")
        n, h, wd, _ = (int(d) for d in x.shape)
        ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
        return te.compute((n, (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1, c),
                          lambda b, y, xx, ch: te.sum(x[b, y * sh + ry * dh, xx * sw + rx * dw, ch].astype("int32"),
                                                      axis=[ry, rx]), name="window_sum")

    return bb.call_te(compute, data, primfunc_name_hint="window_sum_int8")


GROUPED_ATTR = "graphopt.grouped_int8"  # block annotation: output channels per vector (`grouped_channel_tile`)

# Reductions (kernel taps × input channels per group) at most this long take `legalize_grouped_conv2d`:
# its schedule unrolls them whole (a depthwise 3×3 is 9; wider groups are nearly dense convs)
GROUPED_MAX_REDUCTION = 64


def grouped_channel_tile(channels: int, per_group: int, vector_bytes: int) -> int:
    """Output channels per vector of `legalize_grouped_conv2d`: a whole int8 vector, or half or a quarter
    of one (at least 8) — one dividing the `per_group` outputs of a group (> 1: each vector then reads
    one broadcast input channel per tap, not one per group), else one dividing `channels` (e.g. 24 on
    NEON: 8), else a whole vector (channels padded)."""
    tiles = [t for t in (vector_bytes, vector_bytes // 2, vector_bytes // 4) if t >= 8]
    return next((t for t in tiles if per_group > 1 and per_group % t == 0),
                next((t for t in tiles if channels % t == 0), vector_bytes))


def legalize_grouped_conv2d(bb: relax.BlockBuilder, call: relax.Call, vector_bytes: int):
    """int8 NHWC/HWIO grouped or depthwise conv2d (groups > 1, constant weights, at most
    `GROUPED_MAX_REDUCTION` taps × input channels per group) as a compute vectorizable over output
    channels, or None.

    NEON and x86 have no int8 dot product across lanes that fits a depthwise conv (it reduces over
    taps, not channels), so — as XNNPACK's and CMSIS-NN's depthwise kernels do — each output channel
    lane multiplies int8 × int8 into int16 and sums two taps' products in int16 before widening into
    its int32 accumulator (aarch64: ``smull``, ``smlal``, ``saddw``/``saddw2``: 4 instructions per
    16 MACs). Two products fit int16 unless both weights are −128; a layer with a −128 weight widens
    every product on its own. The weights are packed to ``[R (even), F]`` (R = KH·KW·C/groups in HWIO
    order, zero rows and channels padding R to pairs and F to whole `channel_tile`s): one vector load
    per tap. Output channels beyond F read zero-padded input channels and are dropped. `vector_bytes`:
    the target's int8 vector (`grouped_channel_tile`)."""
    attrs = call.attrs
    data = call.args[0]
    groups = int(attrs.groups)
    w = _int8_conv_weight(call)
    if w is None or groups == 1:
        return None
    kh, kw, g_in, f = w.shape
    c = int(data.ty.shape[-1])
    taps = kh * kw * g_in
    if taps > GROUPED_MAX_REDUCTION or c != g_in * groups or f % groups:
        return None
    g_out = f // groups
    pair = 2 if int(w.min(initial=0)) > -128 else 1
    tile = grouped_channel_tile(f, g_out, vector_bytes)
    fp = _ceil(f, tile)
    packed = np.pad(w.reshape(taps, f), [(0, _ceil(taps, pair) - taps), (0, fp - f)])
    cp = -(-fp // g_out) * g_in  # input channels the padded output channels read
    (sh, sw), (dh, dw) = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
    padding = [int(v) for v in attrs.padding]

    def compute(x, wp):
        pt, pl, pb, pr = padding
        if any(padding) or cp != c:
            x = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr, cp - c], name="pad_temp")
        n, h, wd, _ = (int(d) for d in x.shape)
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
        p = te.reduce_axis((0, packed.shape[0] // pair), "p")

        def product(b, y, xx, ff, t):
            tap = tvm.tirx.min(t, taps - 1)  # the odd pair's second half: weight 0, any valid tap
            ry, rx, rc = tap // (kw * g_in), tap // g_in % kw, tap % g_in
            return x[b, y * sh + ry * dh, xx * sw + rx * dw, ff // g_out * g_in + rc].astype("int16") \
                * wp[t, ff].astype("int16")

        def body(b, y, xx, ff):
            prods = [product(b, y, xx, ff, pair * p + i) for i in range(pair)]
            return te.sum((prods[0] + prods[1] if pair == 2 else prods[0]).astype("int32"), axis=p)

        acc = te.compute((n, oh, ow, fp), body, name="conv2d_int8_grouped", attrs={GROUPED_ATTR: tile})
        return _finish(acc, f, ())

    return bb.call_te(compute, data, relax.const(packed, "int8"), primfunc_name_hint="conv2d_int8_grouped")


DEPTHWISE_DSP_ATTR = "graphopt.depthwise_dsp"  # block annotation: the `intrin_dsp_depthwise` intrinsic


def legalize_depthwise_dsp(bb: relax.BlockBuilder, call: relax.Call, kernels, pad_value: int = 0):
    """int8 NHWC/HWIO depthwise conv2d (channel multiplier 1, any window, stride and dilation, constant
    weights) for the Cortex-M DSP intrinsics of `intrin_dsp_depthwise` (`kernels`, preferred first: the
    first whose weight storage the active `WeightStorage` allows), or None. Channels are zero-padded to
    whole 4-channel calls (input and weights; the padding outputs are dropped); the weights are packed
    ``[KH, KW, C/4, …]`` in the kernel's layout; spatial padding reads `pad_value`. The block is annotated
    `DEPTHWISE_DSP_ATTR` for `schedules.DepthwiseDsp`. Declines channel multipliers > 1 (each call's 4
    outputs must read 4 neighbouring input channels) and 1×1 windows (a per-channel scale: no reduction)."""
    attrs = call.attrs
    data = call.args[0]
    w = _int8_conv_weight(call)
    if w is None:
        return None
    kh, kw, g_in, f = w.shape
    n, h, wd, c = (int(d) for d in data.ty.shape)
    if g_in != 1 or int(attrs.groups) != c or f != c or kh * kw == 1:
        return None
    policy = active_storage()
    k = next((k for k in kernels if _allowed(k, w, policy)), None)
    if k is None:
        return None
    lanes = k.lanes
    cp = _ceil(c, lanes)
    packed = k.pack(np.pad(w[:, :, 0, :], [(0, 0), (0, 0), (0, cp - c)]))
    (sh, sw), (dh, dw) = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
    pt, pl, pb, pr = (int(v) for v in attrs.padding)
    oh, ow = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    _record(kernels, w, packed, k, f"depthwise conv2d {kh}x{kw} {c}", n * oh * ow * c * kh * kw)

    def compute(x, wp):
        if pt or pl or pb or pr or cp != c:
            x = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr, cp - c], pad_value=pad_value, name="pad_temp")
        ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
        acc = te.compute((n, oh, ow, cp), lambda b, y, xx, ch: te.sum(
            x[b, y * sh + ry * dh, xx * sw + rx * dw, ch].astype("int32")
            * k.weight(wp, (ry, rx, ch // lanes), ch % lanes).astype("int32"), axis=[ry, rx]),
            name="conv2d_int8_depthwise", attrs={DEPTHWISE_DSP_ATTR: k.intrin})
        return _finish(acc, f, ())

    return bb.call_te(compute, data, relax.const(packed, str(packed.dtype)), primfunc_name_hint="conv2d_int8_depthwise")


def legalize_grouped_patches(bb: relax.BlockBuilder, call: relax.Call, kernels: tuple[DotKernel, ...]):
    """int8 NHWC/HWIO grouped conv2d (groups > 1, more than one input channel per group, constant weights, no
    padding of its own) as a grouped 1×1 conv over `patches.patches` of its input — each group's window one
    row of KH·KW·C/groups values padded once — taken by `legalize_grouped_dot`, or None where `patches` or no
    kernel whose lanes divide a group's outputs fits. On NEON without dotprod, where the grouped kernel
    (`legalize_grouped_conv2d`) multiplies one broadcast input channel per tap: mobilenet_blocks' 24→32
    groups=4 conv on arm-a53 55,435 instructions → 39,951 + 7,344 for the copy."""
    attrs = call.attrs
    data = call.args[0]
    groups = int(attrs.groups)
    w = _int8_conv_weight(call)
    if w is None or groups == 1:
        return None
    kh, kw, g_in, f = w.shape
    c = int(data.ty.shape[-1])
    strides, dilation = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
    if g_in == 1 or c != g_in * groups or f % groups \
            or not patches.fits(kh, kw, c, [int(v) for v in attrs.padding], dilation, groups):
        return None
    taps = kh * kw * g_in
    k = choose([k for k in kernels if f // groups % k.lanes == 0], w.reshape(1, 1, taps, f), taps)
    if k is None:
        return None
    out_shape = [int(d) for d in call.ty.shape]
    copied, flat = _window_copy(bb, data, w, strides, _ceil(taps, k.depth), out_shape, groups)
    conv = bb.normalize(relax.op.nn.conv2d(copied, relax.const(flat), [1, 1], [0, 0, 0, 0], [1, 1], groups, "NHWC",
                                           "HWIO", "NHWC", "int32"))
    return legalize_grouped_dot(bb, conv, kernels, layer=(f"conv2d {kh}x{kw} {c}->{f} groups={groups}",
                                                          int(np.prod(out_shape[:-1])) * taps * f))


def legalize_grouped_dot(bb: relax.BlockBuilder, call: relax.Call, kernels: tuple[DotKernel, ...], pad_value: int = 0,
                         layer: tuple[str, int] | None = None):
    """int8 NHWC/HWIO grouped conv2d (groups > 1, constant weights) as one dense dot-kernel conv per group, or
    None. A kernel whose `DotKernel.lanes` divide each group's output channels is chosen (`choose`), so a
    call's lanes lie in one group, and the call reads that group's input channels straight from the padded
    NHWC input: ``depth`` contiguous values from channel ``g · C/groups`` per tap, C/groups padded to whole
    `DotKernel.depth` (the values past a group's channels — the next group's, or the channel padding of
    the last — meet zero weights). The padded input is the one copy `schedules.TensorizedDot` makes; its
    spatial padding reads `pad_value` (`fuse_input_pads`). Declines (None) groups whose output channels no
    kernel's lanes divide (padding them, the output's channels had to be gathered back in the epilogue:
    32→16 groups=8 on arm-a55 ran 312k instructions against the grouped kernel's 81k) or whose reduction
    padding would double it (`choose`; e.g. depthwise convs: `legalize_depthwise_dot` /
    `legalize_grouped_conv2d`). `layer`: the (name, MACs) to record, for a conv legalized as another
    (`legalize_grouped_patches`)."""
    attrs = call.attrs
    data = call.args[0]
    groups = int(attrs.groups)
    w = _int8_conv_weight(call)
    if w is None or groups == 1:
        return None
    kh, kw, g_in, f = w.shape
    c = int(data.ty.shape[-1])
    if c != g_in * groups or f % groups:
        return None
    g_out = f // groups
    # pixels=1: one group's outputs per call, no 2-pixel blocks
    k = choose([k for k in kernels if g_out % k.lanes == 0], w, g_in)
    if k is None:
        return None
    depth = _ceil(g_in, k.depth)
    packed = _pack_conv_weight(w, k)
    out_shape = [int(d) for d in call.ty.shape]
    _record(kernels, w, packed, k, *(layer or (f"conv2d {kh}x{kw} {c}->{f} groups={groups}",
                                              int(np.prod(out_shape[:-1])) * kh * kw * g_in * f)))
    correction = (128 * w.astype(np.int64).sum(axis=(0, 1, 2))).astype(np.int32) \
        if k.data_dtype == "uint8" else None
    tiles = g_out // k.lanes  # kernel calls per group and pixel
    (sh, sw), (dh, dw) = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
    pt, pl, pb, pr = (int(v) for v in attrs.padding)

    def compute(x, wp, *corr):
        # the last group's call reads depth - C/groups channels past the input's; whole int8 vectors per pixel
        x = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr, _ceil(c + depth - g_in, 16) - c], pad_value=pad_value,
                        name="pad_temp")
        n, h, wd, _ = (int(d) for d in x.shape)
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
        if k.data_dtype == "uint8":
            src = x
            x = te.compute(src.shape, lambda *i: _as_data(src[i], k), name="data_u8")
        ry, rx, r = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, depth), "r")
        acc = te.compute(  # ff // lanes: the call's tile; // tiles: its group
            (n, oh, ow, f),
            lambda b, y, xx, ff: te.sum(
                x[b, y * sh + ry * dh, xx * sw + rx * dw, ff // k.lanes // tiles * g_in + r].astype("int32")
                * k.weight(wp, (ff // k.lanes, ry, rx, r // k.depth), ff % k.lanes, r).astype("int32"),
                axis=[ry, rx, r]),
            name="conv2d_int8_dot", attrs={DOT_ATTR: k.intrin})
        return _finish(acc, f, corr)

    return _emit(bb, compute, data, packed, correction, "conv2d_int8_grouped_dot")


DEPTHWISE_ATTR = "graphopt.depthwise_dot"  # block annotation of `legalize_depthwise_dot`'s accumulation
COLUMNS_NAME = "tap_columns"  # its re-laid input block (`intrin_depthwise.COLUMNS`)
# PrimFunc attribute of `converters.quantize_channel_last`'s kernels (scheduled when written)
QUANTIZE_NHWC_ATTR = "graphopt.quantize_nhwc"


def legalize_depthwise_dot(bb: relax.BlockBuilder, call: relax.Call, pad_value: int = 0):
    """int8 NHWC/HWIO depthwise 3×3 conv2d (channel multiplier 1, dilation 1, constant weights) for the
    lane-wise ``sdot`` of `intrin_depthwise` (aarch64 with dotprod), or None. Its spatial padding reads
    `pad_value` (an activation's zero point: `fuse_input_pads`).

    The padded input is re-laid per output row ``y`` as ``P[n, y, x′, c, k] = in[n, y·sh + min(k, 2), x′,
    c]`` — each channel's 3 vertical taps and the third again, 4 bytes per 32-bit lane — and ``out[n, y,
    x, c] = Σ_kx Σ_k P[n, y, x·sw + kx, c, k] · W′[kx, c, k]`` with ``W′[kx, c, k] = w[k, kx, c]`` for
    k < 3 and 0 for k = 3 (packed here, channels zero-padded to whole 16-channel re-layout calls; the
    padding outputs are dropped). With whole 16-channel calls, P is written straight from the unpadded
    input by a kernel of its own (`intrin_depthwise.padded_columns`, the pad included: no pad kernel);
    otherwise the padded input is a stage of the conv's kernel, re-laid by
    `intrin_depthwise.COLUMNS`. The products are summed in int32 (no −128 restriction). Scheduled by
    `schedules.DepthwiseDot`. Declines (None) other windows, dilation, channel multipliers > 1 and outputs
    of a single row or column."""
    from graphopt.targets.lowering import intrin_depthwise as intrin

    attrs = call.attrs
    data = call.args[0]
    w = _int8_conv_weight(call)
    if w is None:
        return None
    kh, kw, g_in, f = w.shape
    n, h, wd, c = (int(d) for d in data.ty.shape)
    if (kh, kw, g_in) != (intrin.ROWS, intrin.ROWS, 1) or int(attrs.groups) != c or f != c \
            or any(int(v) != 1 for v in attrs.dilation) or min(int(call.ty.shape[1]), int(call.ty.shape[2])) < 2:
        return None  # a single output row or column: its loop vanishes in the schedule; the grouped kernel takes it
    cp = _ceil(c, intrin.CHANNELS)
    taps = np.zeros((kw, cp, intrin.TAPS_PER_LANE), np.int8)
    taps[:, :c, :kh] = w[:, :, 0, :].transpose(1, 2, 0)
    sh, sw = (int(v) for v in attrs.strides)
    pt, pl, pb, pr = (int(v) for v in attrs.padding)
    oh, ow = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1

    def accumulate(columns, wp):
        rx, rk = te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, intrin.TAPS_PER_LANE), "rk")
        acc = te.compute((n, oh, ow, cp), lambda b, y, xx, ch: te.sum(
            columns[b, y, xx * sw + rx, ch, rk].astype("int32") * wp[rx, ch, rk].astype("int32"), axis=[rx, rk]),
            name="conv2d_int8_depthwise", attrs={DEPTHWISE_ATTR: intrin.TAPS})
        return _finish(acc, f, ())

    if cp == c:
        width = wd + pl + pr
        func = intrin.padded_columns((n, h, wd, c), oh, width, sh, pt, pl, pad_value)
        gv = bb.add_func(func, "depthwise_columns")
        columns = bb.emit(relax.call_tir(gv, [data], relax.TensorType((n, oh, width, c, intrin.TAPS_PER_LANE),
                                                                       "int8")))
        return bb.call_te(accumulate, columns, relax.const(taps, "int8"), primfunc_name_hint="conv2d_int8_depthwise")

    def compute(x, wp):
        x = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr, cp - c], pad_value=pad_value, name="pad_temp")
        src = x
        columns = te.compute((n, oh, int(x.shape[2]), cp, intrin.TAPS_PER_LANE),
                             lambda b, y, u, ch, k: src[b, y * sh + tvm.tirx.min(k, kh - 1), u, ch], name=COLUMNS_NAME)
        return accumulate(columns, wp)

    return bb.call_te(compute, data, relax.const(taps, "int8"), primfunc_name_hint="conv2d_int8_depthwise")


def legalize_matmul(bb: relax.BlockBuilder, call: relax.Call, kernels: tuple[DotKernel, ...]):
    """int8 ``x @ W`` (W constant [K, N]) → int32 as a tensorizable packed-weight kernel, or None."""
    a, weight = call.args
    if not isinstance(weight, tvm.ir.expr.Constant) or len(weight.ty.shape) != 2 or a.ty.ndim < 2 \
            or str(a.ty.dtype) != "int8" or str(weight.ty.dtype) != "int8" \
            or str(call.attrs.out_dtype) != "int32" or _static(a.ty.shape) is None:
        return None
    w = weight.value.numpy()
    n = w.shape[1]
    rows = int(np.prod([int(d) for d in a.ty.shape][:-1]))
    k = choose(kernels, w, w.shape[0], pixels=rows)
    if k is None:
        return None
    packed = _pack_dense_weight(w, k)
    _record(kernels, w, packed, k, f"dense {w.shape[0]}->{n}", rows * w.size)
    correction = (128 * w.astype(np.int64).sum(axis=0)).astype(np.int32) if k.data_dtype == "uint8" else None

    def paired(x, wp, *corr):  # rows in pairs: [⌈rows/2⌉, N/2, 2, 2] blocks (`_paired_conv`)
        depth = packed.shape[1] * k.depth
        xv = topi.nn.pad(topi.reshape(x, (rows, w.shape[0])), [0, 0], [rows % 2, depth - w.shape[0]],
                         name="pixel_pairs")
        r = te.reduce_axis((0, depth), "k")
        acc = te.compute((-(-rows // 2), packed.shape[0], 2, 2),
                         lambda j, ft, p, i: te.sum(
                             xv[j * 2 + p, r].astype("int32")
                             * k.weight(wp, (ft, r // k.depth), i, r).astype("int32"), axis=r),
                         name="dense_int8_dot", attrs={DOT_ATTR: k.intrin})
        lead = [int(d) for d in x.shape[:-1]]
        strides = [int(np.prod(lead[i + 1:])) for i in range(len(lead))]
        return _finish(acc, n, corr, k, tuple(lead),
                       lambda *i: ((), sum(v * s for v, s in zip(i, strides, strict=True))))

    def compute(x, wp, *corr):
        if k.pixels > 1:
            return paired(x, wp, *corr)
        xd = _prepare_data(x, packed.shape[1] * k.depth, k)
        r = te.reduce_axis((0, packed.shape[1] * k.depth), "k")
        acc = te.compute(
            (*xd.shape[:-1], packed.shape[0] * k.lanes),
            lambda *i: te.sum(xd[(*i[:-1], r)].astype("int32")
                              * k.weight(wp, (i[-1] // k.lanes, r // k.depth), i[-1] % k.lanes, r).astype("int32"),
                              axis=r),
            name="dense_int8_dot", attrs={DOT_ATTR: k.intrin})
        return _finish(acc, n, corr)

    return _emit(bb, compute, a, packed, correction, "dense_int8")


def _finish(acc, channels: int, corr, k: DotKernel | None = None, pixels: tuple = (), pair_at=None):
    """Subtract the unsigned-activation correction and drop the padding channels, if any. A 2-pixel
    kernel's blocks (`dot.mmla_desc`) are read back as ``[*pixels, channels]``; `pair_at(pixel indices)`
    gives (the block's leading indices, the pixel's index along the paired axis)."""
    if k is not None and k.pixels > 1:
        def block(*i):
            lead, j = pair_at(*i[:-1])
            ff = i[-1]
            return acc[(*lead, j // 2, ff // 2, j % 2, ff % 2)]

        return te.compute((*pixels, channels), block, name="dot_epilogue")
    if not corr and int(acc.shape[-1]) == channels:
        return acc
    shape = [*acc.shape[:-1], channels]
    if not corr:
        return te.compute(shape, lambda *i: acc[i], name="dot_epilogue")
    (c,) = corr
    return te.compute(shape, lambda *i: acc[i] - c[i[-1]], name="dot_epilogue")


def _emit(bb, compute, data, packed: np.ndarray, correction, name: str):
    args = [data, relax.const(packed, str(packed.dtype))]
    if correction is not None:
        args.append(relax.const(correction, "int32"))
    return bb.call_te(compute, *args, primfunc_name_hint=name)



def fuse_input_pads(mod: tvm.IRModule, legalize) -> tvm.IRModule:
    """`mod` with each int8 NHWC conv2d (no padding of its own) that reads a constant-valued pad of its
    input's height and width — the converters pad with the activation's zero point — legalized as
    ``legalize(bb, conv, pad_value)`` of a conv on the unpadded input with the pad as its own padding, so
    the kernel reads the pad value at the border instead of a padded copy another kernel wrote (one
    kernel call and one intermediate tensor fewer per padded conv). Where `legalize` returns None the
    pair is left for LegalizeOps."""
    conv2d, pad = tvm.ir.Op.get("relax.nn.conv2d"), tvm.ir.Op.get("relax.nn.pad")

    @relax.expr_functor.mutator
    class _Fuser(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(conv2d) or str(call.attrs.data_layout) != "NHWC" \
                    or any(int(v) for v in call.attrs.padding) or not isinstance(call.args[0], relax.Var):
                return call
            padded = self.lookup_binding(call.args[0])
            if not (isinstance(padded, relax.Call) and padded.op.same_as(pad)) \
                    or str(padded.attrs.pad_mode) != "constant" or str(padded.args[0].ty.dtype) != "int8":
                return call
            widths = [int(v) for v in padded.attrs.pad_width]  # (before, after) per NHWC axis
            value = float(padded.attrs.pad_value)
            if widths[:2] != [0, 0] or widths[6:] != [0, 0] or value != int(value):
                return call
            a = call.attrs
            fused = self.builder_.normalize(relax.op.nn.conv2d(
                padded.args[0], call.args[1], a.strides, [widths[2], widths[4], widths[3], widths[5]], a.dilation,
                a.groups, a.data_layout, a.kernel_layout, a.out_layout, a.out_dtype))
            weight = self.lookup_binding(call.args[1]) if isinstance(call.args[1], relax.Var) else None
            if isinstance(weight, tvm.ir.expr.Constant):  # legalizers pack constant weights only
                fused = relax.Call(fused.op, [fused.args[0], weight], fused.attrs, fused.ty_args)
                fused = self.builder_.normalize(fused)
            out = legalize(self.builder_, fused, int(value))
            return call if out is None else out

    fuser = _Fuser(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fuser.builder_.update_func(gv, fuser.visit_expr(func))
    return relax.transform.DeadCodeElimination()(fuser.builder_.get())
