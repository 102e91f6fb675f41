"""Fold inference BatchNorm into the convolution or linear layer that feeds it.

    y = γ·(W*x + b − μ)/√(σ²+ε) + β  =  (W·s)*x + ((b − μ)·s + β),   s = γ/√(σ²+ε)

``s`` scales W along its output-channel axis (axis 0 for conv/linear; conv_transpose is declined).
Declined, with the reason in the report: BN in training mode, a producer whose output has other
users (folding would change them), non-constant weights or statistics, transposed convolution,
and BN with no conv/linear producer (it stays a per-channel scale and shift).
"""
from __future__ import annotations

import torch
from graphopt.passes._graph import add_constant, arg, constant_of, is_op
from graphopt.passes.base import Decline, GraphPass, PassContext, PassResult, Property
from torch import fx

aten = torch.ops.aten
_CONV = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
_LINEAR = (aten.linear.default,)
_BN_LEGIT = aten._native_batch_norm_legit_no_training.default


def bn_parts(node: fx.Node):
    """(input, weight, bias, mean, var, eps, training, value_node) of a BN node, or None."""
    if is_op(node, aten.batch_norm.default):
        a = node.args
        return a[0], a[1], a[2], a[3], a[4], a[7], a[5], node
    if is_op(node, _BN_LEGIT):
        users = list(node.users)
        if len(users) != 1 or users[0].target.__name__ != "getitem" or users[0].args[1] != 0:
            return None
        a = node.args
        return a[0], a[1], a[2], a[3], a[4], a[6], False, users[0]
    return None


class FoldBatchNorm(GraphPass):
    name = "fold-batchnorm"
    requires = frozenset({Property.ATEN, Property.INFERENCE})
    establishes = frozenset({Property.BN_FOLDED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded, declined = 0, []
        for bn in list(gm.graph.nodes):
            parts = bn_parts(bn)
            if parts is None:
                continue
            x, gamma_n, beta_n, mean_n, var_n, eps, training, value = parts
            reason = self._why_not(gm, x, gamma_n, beta_n, mean_n, var_n, training)
            if reason:
                declined.append(Decline.at(self.name, bn, reason))
                continue
            self._fold(gm, x, gamma_n, beta_n, mean_n, var_n, eps)
            value.replace_all_uses_with(x)
            for n in (value, bn) if value is not bn else (bn,):
                gm.graph.erase_node(n)
            folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, folded > 0, {"folded": folded}, tuple(declined))

    @staticmethod
    def _why_not(gm, x, gamma_n, beta_n, mean_n, var_n, training) -> str | None:
        if training:
            return "BatchNorm runs in training mode (batch statistics); call model.eval() first"
        if is_op(x, aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input):
            return "producer is a transposed convolution (output channels on weight axis 1); not folded"
        if not is_op(x, *_CONV, *_LINEAR):
            return "no conv/linear producer to fold into; kept as a per-channel scale and shift"
        if len(x.users) != 1:
            return f"producer {x.name} has {len(x.users)} users; folding would change the others"
        if constant_of(gm, x.args[1]) is None or (len(x.args) > 2 and x.args[2] is not None
                                                 and constant_of(gm, x.args[2]) is None):
            return "producer weight or bias is not a constant"
        if any(n is not None and constant_of(gm, n) is None for n in (gamma_n, beta_n, mean_n, var_n)):
            return "BatchNorm statistics or affine parameters are not constants"
        return None

    @staticmethod
    def _fold(gm, x, gamma_n, beta_n, mean_n, var_n, eps) -> None:
        w = constant_of(gm, x.args[1])
        b = constant_of(gm, arg(x, 2, "bias")) if arg(x, 2, "bias") is not None else None
        mean, var = constant_of(gm, mean_n), constant_of(gm, var_n)
        gamma = constant_of(gm, gamma_n) if gamma_n is not None else torch.ones_like(mean)
        beta = constant_of(gm, beta_n) if beta_n is not None else torch.zeros_like(mean)
        with torch.no_grad():
            scale = gamma / torch.sqrt(var + eps)
            new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
            new_b = ((b if b is not None else torch.zeros_like(mean)) - mean) * scale + beta
        w_node = add_constant(gm, f"{x.name}_bnfold_weight", new_w.to(w.dtype), before=x)
        b_node = add_constant(gm, f"{x.name}_bnfold_bias", new_b.to(w.dtype), before=x)
        args = list(x.args)
        args[1] = w_node
        if len(args) > 2:
            args[2] = b_node
            x.args = tuple(args)
        else:
            x.args = tuple(args)
            x.kwargs = {**x.kwargs, "bias": b_node}
