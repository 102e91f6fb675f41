"""Exact layer-norm decomposition for targets without a fused layer-norm kernel.

    layer_norm(x, w, b, ε) = (x − μ) · rsqrt(mean((x − μ)², dims) + ε) · w + b,   μ = mean(x, dims)

over the trailing ``normalized_shape`` dims. Numerics contract: exact in real arithmetic (the
biased variance, as PyTorch's); float results differ by summation-order rounding only.
"""
from __future__ import annotations

import torch

from graphopt.passes.rewrite import LegalizePass, Rewrite, unfit

aten = torch.ops.aten


def _layer_norm(e, args, kwargs):
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    a = {n: args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)}
    x, dims = a["input"], list(range(-len(a["normalized_shape"]), 0))
    d = e.call(aten.sub.Tensor, x, e.call(aten.mean.dim, x, dims, True))
    var = e.call(aten.mean.dim, e.call(aten.mul.Tensor, d, d), dims, True)
    y = e.call(aten.mul.Tensor, d, e.call(aten.rsqrt.default, e.call(aten.add.Tensor, var, a["eps"] or 1e-5)))
    if a["weight"] is not None:
        y = e.call(aten.mul.Tensor, y, a["weight"])
    return e.call(aten.add.Tensor, y, a["bias"]) if a["bias"] is not None else y


class LegalizeNorm(LegalizePass):
    name = "legalize-norm"
    REWRITES = (
        Rewrite((aten.layer_norm.default,), "layer norm → mean, sub, mul, rsqrt, add",
                ("mean", "sub", "mul", "add", "rsqrt"), "layer_norm(x) = (x − μ)·rsqrt(σ² + ε)·w + b",
                unfit, _layer_norm),
    )
