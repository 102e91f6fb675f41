"""Exact 1×1 convolution ↔ linear rewrites, for targets that run only one of the two.

    conv1×1(x, W, b, stride s) = permute(linear(permute(x[:, :, ::s, ::s], NHWC), W[:, :, 0, 0], b), NCHW)
    linear(x, W, b)            = reshape(conv1×1(reshape(x, (−1, K, 1, 1)), W[:, :, None, None], b), (..., N))

Numerics contract: exact — the same dot products over the same channels. The conv rewrite needs
a 1×1 kernel, zero padding, no dilation, groups = 1 and constant weights; otherwise it is left for
the other conv rewrites or the operator-set check.
"""
from __future__ import annotations

import torch

from graphopt.ops import conv_params
from graphopt.passes.graph import constant_of
from graphopt.passes.legalize_conv import conv_args
from graphopt.passes.rewrite import LegalizePass, Rewrite, unfit

aten = torch.ops.aten


def _pointwise(node, gm, ops):
    params = conv_params(node, gm)
    a = conv_args(node.args, node.kwargs)
    if params is None or params[:3] != ((1, 1), 1, (1, 1)) or a["padding"] != [0, 0] \
            or constant_of(gm, a["weight"]) is None:
        return None
    return unfit(node, gm, ops)


def _conv_to_linear(e, args, kwargs):
    a = conv_args(args, kwargs)
    x, (sh, sw) = a["input"], a["stride"]
    if (sh, sw) != (1, 1):
        x = e.call(aten.slice.Tensor, e.call(aten.slice.Tensor, x, 2, 0, None, sh), 3, 0, None, sw)
    w = e.value(a["weight"])
    y = e.call(aten.linear.default, e.call(aten.permute.default, x, [0, 2, 3, 1]),
               e.const("linear_w", w[:, :, 0, 0]), a["bias"])
    return e.call(aten.permute.default, y, [0, 3, 1, 2])


def _const_weight(node, gm, ops):
    return unfit(node, gm, ops) if constant_of(gm, node.args[1]) is not None else None


def _linear_to_conv(e, args, kwargs):
    x, w = args[0], e.value(args[1])
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    shape = list(e.meta(x).shape)
    y = e.call(aten.conv2d.default, e.call(aten.reshape.default, x, [-1, shape[-1], 1, 1]),
               e.const("conv_w", w[:, :, None, None]), b)
    return e.call(aten.reshape.default, y, shape[:-1] + [w.shape[0]])


class LegalizeLinear(LegalizePass):
    name = "legalize-linear"
    REWRITES = (
        Rewrite((aten.conv2d.default,), "1×1 conv → linear", ("linear",),
                "conv1×1(x, W) = NCHW(linear(NHWC(x), W))", _pointwise, _conv_to_linear),
        Rewrite((aten.linear.default,), "linear → 1×1 conv", ("conv2d",),
                "linear(x, W) = conv1×1(x as (−1, K, 1, 1), W)", _const_weight, _linear_to_conv),
    )
