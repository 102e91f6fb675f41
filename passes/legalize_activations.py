"""Exact activation rewrites into clamp / ReLU (float64 results equal the original's), and eval
dropout (e.g. the in-place ``dropout_`` identity removal leaves) as the identity.

Each rule replaces an activation the target lacks by ops it has, with PyTorch's own evaluation
order (so float32 results match too). Refuses nothing: an activation no rule covers is left for
the operator-set check, which names it.
"""
from __future__ import annotations

import torch

from graphopt.passes.graph import arg
from graphopt.passes.rewrite import LegalizePass, Rewrite, unfit

aten = torch.ops.aten


def _hardtanh(e, args, kwargs):
    lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return e.call(aten.clamp.default, args[0], lo, hi)


def _relu_via_clamp(e, args, kwargs):
    return e.call(aten.clamp.default, args[0], 0.0)


def _clamp_min0(node, gm, ops):
    lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
    return unfit(node, gm, ops) if lo == 0 and hi is None else None


def _gate(e, x, div: bool):
    g = e.call(aten.clamp.default, e.call(aten.add.Tensor, x, 3.0), 0.0, 6.0)
    return e.call(aten.div.Tensor, g, 6.0) if div else e.call(aten.mul.Tensor, g, 1.0 / 6.0)


REWRITES = (
    Rewrite((aten.dropout_.default, aten.dropout.default), "eval dropout → identity", (),
            "dropout(x, p, train=False) = x  (in-place form too)", lambda n, gm, ops: arg(n, 2, "train") is False
            and unfit(n, gm, ops), lambda e, a, k: a[0]),
    Rewrite((aten.hardtanh.default,), "hardtanh → clamp", ("clamp",),
            "hardtanh(x, lo, hi) = clamp(x, lo, hi)", unfit, _hardtanh),
    Rewrite((aten.relu6.default,), "relu6 → clamp", ("clamp",),
            "relu6(x) = clamp(x, 0, 6)", unfit, lambda e, a, k: e.call(aten.clamp.default, a[0], 0.0, 6.0)),
    Rewrite((aten.relu.default,), "relu → clamp", ("clamp",),
            "relu(x) = clamp(x, 0)", unfit, _relu_via_clamp),
    Rewrite((aten.clamp.default,), "clamp(x, 0) → relu", ("relu",),
            "clamp(x, 0, ∞) = relu(x)", _clamp_min0, lambda e, a, k: e.call(aten.relu.default, a[0])),
    Rewrite((aten.hardsigmoid.default,), "hardsigmoid → clamp(x + 3, 0, 6) / 6", ("add", "clamp", "div"),
            "hardsigmoid(x) = min(max(x + 3, 0), 6) / 6", unfit, lambda e, a, k: _gate(e, a[0], True)),
    Rewrite((aten.hardsigmoid.default,), "hardsigmoid → clamp(x + 3, 0, 6) · ⅙", ("add", "clamp", "mul"),
            "hardsigmoid(x) = min(max(x + 3, 0), 6) · (1/6)  (1/6 rounded once)", unfit,
            lambda e, a, k: _gate(e, a[0], False)),
    Rewrite((aten.hardswish.default,), "hardswish → x · clamp(x + 3, 0, 6) / 6", ("add", "clamp", "mul", "div"),
            "hardswish(x) = x · min(max(x + 3, 0), 6) / 6", unfit,
            lambda e, a, k: e.call(aten.div.Tensor, e.call(aten.mul.Tensor, a[0], e.call(
                aten.clamp.default, e.call(aten.add.Tensor, a[0], 3.0), 0.0, 6.0)), 6.0)),
    Rewrite((aten.hardswish.default,), "hardswish → x · clamp(x + 3, 0, 6) · ⅙", ("add", "clamp", "mul"),
            "hardswish(x) = x · (min(max(x + 3, 0), 6) · (1/6))  (1/6 rounded once)", unfit,
            lambda e, a, k: e.call(aten.mul.Tensor, a[0], _gate(e, a[0], False))),
)


class LegalizeActivations(LegalizePass):
    name = "legalize-activations"
    REWRITES = REWRITES
