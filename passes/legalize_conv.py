"""Exact convolution rewrites for targets whose conv kernels are restricted (float ``conv2d``).

    grouped / depthwise → split:  conv(x, W, groups=g) = cat_i conv(x[:, i·c:(i+1)·c], W[i·o:(i+1)·o])
    dilated → dense:              conv(x, W, dilation=d) = conv(x, W_d),  W_d = W with d−1 zeros between taps
    small kernel → allowed size:  conv(x, W, pad=p) = conv(x, pad_zero(W, r), pad=p + r)   (r per side)

Numerics contract: exact — every output is the same sum of products (the added taps multiply by
0); only the summation order may change (equal in float64 to rounding). The kernel rewrite needs
an allowed size K ≥ k with K − k even. Refuses (leaves for the operator-set check): string
padding (``padding="same"``), int8 ``qconv2d`` (restricted kernels are a float-graph rewrite
here), convolutions whose weights are not constants.
"""
from __future__ import annotations

import torch

from graphopt.ops import conv_params
from graphopt.passes.rewrite import LegalizePass, Rewrite, unfit

aten = torch.ops.aten
CONV = aten.conv2d.default


def conv_args(args, kwargs) -> dict:
    """conv2d's arguments by name, with 2-element lists for stride/padding/dilation."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    a = {n: args[i] if i < len(args) else kwargs.get(n, defaults.get(n)) for i, n in enumerate(names)}
    for n in ("stride", "padding", "dilation"):
        v = a[n]
        a[n] = [int(v)] * 2 if isinstance(v, int) else [int(t) for t in v] * (2 if len(v) == 1 else 1)
    a["groups"] = int(a["groups"])
    return a


def _emit_conv(e, x, w, b, a: dict, **changes):
    p = {**a, **changes}
    return e.call(CONV, x, w, b, p["stride"], p["padding"], p["dilation"], p["groups"])


def _constant_weights(node, gm) -> bool:
    from graphopt.passes.graph import constant_of

    a = conv_args(node.args, node.kwargs)
    return constant_of(gm, a["weight"]) is not None and (a["bias"] is None or constant_of(gm, a["bias"]) is not None)


def _needs_split(node, gm, ops):
    rule, params = ops.rule("conv2d"), conv_params(node, gm)
    if rule is None or params is None or isinstance(node.args[4] if len(node.args) > 4 else 0, str):
        return None
    _, groups, _, cin = params
    blocked = (groups == cin and not rule.depthwise) or (1 < groups < cin and not rule.grouped)
    return unfit(node, gm, ops) if groups > 1 and blocked and _constant_weights(node, gm) else None


def _split(e, args, kwargs):
    a = conv_args(args, kwargs)
    w, b, g = e.value(a["weight"]), e.value(a["bias"]) if a["bias"] is not None else None, a["groups"]
    cg, og = w.shape[1], w.shape[0] // g
    parts = []
    for i in range(g):
        xi = e.call(aten.slice.Tensor, a["input"], 1, i * cg, (i + 1) * cg)
        wi = e.const(f"w{i}", w[i * og:(i + 1) * og])
        bi = e.const(f"b{i}", b[i * og:(i + 1) * og]) if b is not None else None
        parts.append(_emit_conv(e, xi, wi, bi, a, groups=1))
    return e.call(aten.cat.default, parts, 1)


def _needs_dense(node, gm, ops):
    rule, params = ops.rule("conv2d"), conv_params(node, gm)
    if rule is None or params is None or rule.dilation or not _constant_weights(node, gm):
        return None
    return unfit(node, gm, ops) if any(d != 1 for d in params[2]) else None


def _dense(e, args, kwargs):
    a = conv_args(args, kwargs)
    w, (dh, dw) = e.value(a["weight"]), a["dilation"]
    o, i, kh, kw = w.shape
    dense = w.new_zeros(o, i, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    dense[:, :, ::dh, ::dw] = w
    return _emit_conv(e, a["input"], e.const("dense_w", dense), a["bias"], a, dilation=[1, 1])


def _target_kernel(kernel: tuple, ops) -> tuple[int, int] | None:
    """The smallest allowed kernel that zero-padding ``kernel`` on both sides reaches, or None."""
    rule = ops.rule("conv2d")
    if rule is None or rule.kernel_sizes is None or kernel in rule.kernel_sizes:
        return None
    kh, kw = kernel
    fits = [(h, w) for h, w in rule.kernel_sizes if h >= kh and w >= kw and (h - kh) % 2 == 0 and (w - kw) % 2 == 0]
    return min(fits, key=lambda k: k[0] * k[1]) if fits else None


def _needs_pad(node, gm, ops):
    padding = node.args[4] if len(node.args) > 4 else node.kwargs.get("padding", 0)
    params = conv_params(node, gm)
    if isinstance(padding, str) or params is None or params[2] != (1, 1) or not _constant_weights(node, gm) \
            or _target_kernel(params[0], ops) is None:
        return None
    return unfit(node, gm, ops)


def _pad_kernel(e, args, kwargs):
    a = conv_args(args, kwargs)
    w = e.value(a["weight"])
    target = _target_kernel(tuple(w.shape[2:]), e.ops)
    rh, rw = (target[0] - w.shape[2]) // 2, (target[1] - w.shape[3]) // 2
    padded = torch.nn.functional.pad(w, (rw, rw, rh, rh))
    return _emit_conv(e, a["input"], e.const("padded_w", padded), a["bias"], a,
                      padding=[a["padding"][0] + rh, a["padding"][1] + rw])


class LegalizeConv(LegalizePass):
    name = "legalize-conv"
    REWRITES = (
        Rewrite((CONV,), "grouped conv → split convs + cat", ("conv2d",),
                "conv(x, W, groups=g) = cat_i conv(x_i, W_i)", _needs_split, _split),
        Rewrite((CONV,), "dilated conv → dense zero-inserted kernel", ("conv2d",),
                "conv(x, W, dilation=d) = conv(x, W with d−1 zeros between taps)", _needs_dense, _dense),
        Rewrite((CONV,), "conv kernel → zero-padded allowed kernel", ("conv2d",),
                "conv(x, W, pad=p) = conv(x, pad_zero(W, r), pad=p + r)", _needs_pad, _pad_kernel),
    )
