"""Exact decomposition of ``scaled_dot_product_attention`` for targets without a fused attention kernel.

    sdpa(q, k, v, mask, scale s) = softmax(q·kᵀ·s + M) · v,   s = 1/√E by default,
    M = mask (float), or −∞ where a boolean mask (or the causal triangle) is False; rows a boolean
    mask hides entirely give 0 (PyTorch's safe softmax)

Numerics contract: exact in real arithmetic (PyTorch's math path); float results differ by
rounding order only. Refuses (leaves for the operator-set check): dropout_p ≠ 0 and
``enable_gqa`` with differing head counts.
"""
from __future__ import annotations

import math

import torch

from graphopt.passes.rewrite import LegalizePass, Rewrite, unfit

aten = torch.ops.aten
_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _args(args, kwargs) -> dict:
    a = {n: args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(_NAMES)}
    return {**a, "scale": kwargs.get("scale"), "enable_gqa": kwargs.get("enable_gqa", False)}


def _plain(node, gm, ops):
    a = _args(node.args, node.kwargs)
    q, k = a["query"].meta["val"], a["key"].meta["val"]
    if (a["dropout_p"] or 0.0) != 0.0 or (a["enable_gqa"] and q.shape[-3] != k.shape[-3]):
        return None
    return unfit(node, gm, ops)


def _attention(e, args, kwargs):
    a = _args(args, kwargs)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    qs, ks = e.meta(q).shape, e.meta(k).shape
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(qs[-1])
    scores = e.call(aten.mul.Tensor, e.call(aten.matmul.default, q, e.call(aten.transpose.int, k, -2, -1)), scale)
    def masked(keep):
        neg_inf = e.const("neg_inf", torch.tensor(float("-inf"), dtype=e.meta(q).dtype))
        return e.call(aten.where.self, keep, scores, neg_inf)

    if a["is_causal"]:
        scores = masked(e.const("causal", torch.ones(qs[-2], ks[-2], dtype=torch.bool).tril()))
    bool_mask = mask is not None and e.meta(mask).dtype == torch.bool
    if bool_mask:
        scores = masked(mask)
    elif mask is not None:
        scores = e.call(aten.add.Tensor, scores, mask)
    p = e.call(aten.softmax.int, scores, -1)
    if bool_mask:  # PyTorch's safe softmax: rows the mask hides entirely attend to nothing (0, not NaN)
        p = e.call(aten.where.self, e.call(aten.any.dim, mask, -1, True), p,
                   e.const("zero", torch.tensor(0.0, dtype=e.meta(q).dtype)))
    return e.call(aten.matmul.default, p, v)


class LegalizeAttention(LegalizePass):
    name = "legalize-attention"
    REWRITES = (
        Rewrite((aten.scaled_dot_product_attention.default,), "attention → matmul, softmax",
                ("matmul", "mul", "softmax", "add", "where", "any"), "sdpa(q, k, v) = softmax(q·kᵀ·s + M)·v",
                _plain, _attention),
    )
