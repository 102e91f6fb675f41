"""Exact average-pooling rewrites: adaptive pooling as fixed windows, pooling as depthwise convolution.

    adaptive_avg_pool2d(x, (oh, ow)) = avg_pool2d(x, k = s = (H/oh, W/ow))        (H, W divisible)
    avg_pool2d(x, k, s, p)           = conv2d(x, 1/(kh·kw) per tap, s, p, groups=C)  (count_include_pad,
                                                                                  no ceil_mode/divisor)
    mean(x, [2, 3], keepdim)         = conv2d(x, 1/(H·W) per tap, groups=C) (flattened unless keepdim)

Numerics contract: exact in real arithmetic; float results differ from PyTorch's sum-then-divide
by rounding only (Σ x·(1/k) vs. Σ x / k; equal in float64 to ~1e-15 relative). Refuses (leaves for
the operator-set check): adaptive pooling to sizes that do not divide the input, ceil_mode,
``count_include_pad=False`` with padding, ``divisor_override``, and means over other dims.
"""
from __future__ import annotations

import torch

from graphopt.passes.graph import arg
from graphopt.passes.rewrite import LegalizePass, Rewrite, unfit

aten = torch.ops.aten


def _pair(v) -> list[int]:
    return [int(v)] * 2 if isinstance(v, int) else [int(t) for t in v] * (2 if len(v) == 1 else 1)


def _adaptive_window(node) -> list[int] | None:
    shape = node.args[0].meta["val"].shape
    out = _pair(node.args[1])
    if len(shape) != 4 or any(o <= 0 or s % o for s, o in zip(shape[2:], out, strict=True)):
        return None
    return [s // o for s, o in zip(shape[2:], out, strict=True)]


def _needs_adaptive(node, gm, ops):
    return unfit(node, gm, ops) if _adaptive_window(node) is not None else None


def _depthwise_mean(e, x, kernel, stride, padding):
    c = e.meta(x).shape[1]
    w = torch.full((c, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=e.meta(x).dtype)
    return e.call(aten.conv2d.default, x, e.const("mean_w", w), None, stride, padding, [1, 1], c)


def _adaptive_to_pool(e, args, kwargs):
    shape, out = e.meta(args[0]).shape, _pair(args[1])
    k = [s // o for s, o in zip(shape[2:], out, strict=True)]
    return e.call(aten.avg_pool2d.default, args[0], k, k)


def _adaptive_to_conv(e, args, kwargs):
    shape, out = e.meta(args[0]).shape, _pair(args[1])
    k = [s // o for s, o in zip(shape[2:], out, strict=True)]
    return _depthwise_mean(e, args[0], k, k, [0, 0])


def _plain_window(node, gm, ops):
    padding = _pair(arg(node, 3, "padding", 0))
    if arg(node, 4, "ceil_mode", False) or arg(node, 6, "divisor_override") is not None \
            or (not arg(node, 5, "count_include_pad", True) and any(padding)):
        return None
    return unfit(node, gm, ops)


def _avg_to_conv(e, args, kwargs):
    kernel = _pair(args[1])
    stride = _pair(args[2]) if len(args) > 2 and args[2] else kernel
    padding = _pair(args[3]) if len(args) > 3 else [0, 0]
    return _depthwise_mean(e, args[0], kernel, stride, padding)


def _spatial_mean(node, gm, ops):
    shape = node.args[0].meta["val"].shape
    dims = sorted(d % len(shape) for d in (node.args[1] if len(node.args) > 1 else []))
    return unfit(node, gm, ops) if len(shape) == 4 and dims == [2, 3] and node.args[0].meta["val"].is_floating_point() \
        else None


def _mean_to_conv(e, args, kwargs):
    x = args[0]
    y = _depthwise_mean(e, x, list(e.meta(x).shape[2:]), [1, 1], [0, 0])
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return y if keepdim else e.call(aten.flatten.using_ints, y, 1)


class LegalizePool(LegalizePass):
    name = "legalize-pool"
    REWRITES = (
        Rewrite((aten.adaptive_avg_pool2d.default,), "adaptive avg-pool → avg-pool", ("avg_pool2d",),
                "adaptive_avg_pool2d(x, H/k × W/k) = avg_pool2d(x, k, k)", _needs_adaptive, _adaptive_to_pool),
        Rewrite((aten.adaptive_avg_pool2d.default,), "adaptive avg-pool → depthwise conv", ("conv2d",),
                "adaptive_avg_pool2d(x, H/k × W/k) = dwconv(x, 1/k², stride k)", _needs_adaptive, _adaptive_to_conv),
        Rewrite((aten.avg_pool2d.default,), "avg-pool → depthwise conv", ("conv2d",),
                "avg_pool2d(x, k, s, p) = dwconv(x, 1/(kh·kw), s, p)", _plain_window, _avg_to_conv),
        Rewrite((aten.mean.dim,), "spatial mean → depthwise conv", ("conv2d",),
                "mean(x, [H, W]) = dwconv(x, 1/(H·W), kernel H×W)", _spatial_mean, _mean_to_conv),
    )
