"""Static cost model of a captured graph: parameters, MACs per op, per module and per precision.

MACs (multiply-accumulates) are counted for the ops that dominate compute — convolutions,
linear/matmul family, attention — from shapes propagated on the example inputs. Elementwise
work is not counted (it is reported as zero, by convention of the field). graphopt's integer
ops (`graphopt.qops`) state their own cost (`qops.cost`): MACs, the weight × activation precision
they run at (``w8a8``, ``w4a8``, ``w1a1`` …) and the weight count of packed low-bit operands, so
params count weights, not bytes, while param_bytes is what is stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from graphopt import qops
from graphopt.source import node_module

aten = torch.ops.aten


def _shape(n) -> tuple[int, ...] | None:
    tm = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _conv(n):  # out · (Cin/groups) · prod(kernel)
    w = _shape(n.args[1])
    return _numel(_shape(n)) * _numel(w[1:]) if w else 0


def _conv_transpose(n):  # every input element scatters Cout/groups · prod(kernel)
    w = _shape(n.args[1])
    return _numel(_shape(n.args[0])) * _numel(w[1:]) if w else 0


def _linear(n):  # out · in_features
    w = _shape(n.args[1])
    return _numel(_shape(n)) * w[-1] if w else 0


def _matmul(n):  # out · K, K = last dim of the first operand
    a = _shape(n.args[0])
    return _numel(_shape(n)) * a[-1] if a else 0


def _addmm(n):  # addmm(bias, a, b): out · K
    a = _shape(n.args[1])
    return _numel(_shape(n)) * a[-1] if a else 0


def _sdpa(n):  # QKᵀ and PV: 2 · B·H·L·S·D
    q, k = _shape(n.args[0]), _shape(n.args[1])
    return 2 * _numel(q) * k[-2] if q and k else 0


MAC_RULES = {
    aten.conv1d.default: _conv, aten.conv2d.default: _conv, aten.conv3d.default: _conv,
    aten.convolution.default: _conv,
    aten.conv_transpose1d.default: _conv_transpose, aten.conv_transpose2d.input: _conv_transpose,
    aten.linear.default: _linear,
    aten.matmul.default: _matmul, aten.mm.default: _matmul, aten.bmm.default: _matmul,
    aten.addmm.default: _addmm, aten.baddbmm.default: _addmm,
    aten.scaled_dot_product_attention.default: _sdpa,
}


@dataclass
class Cost:
    params: int
    param_bytes: int
    macs: int
    macs_by_module: dict[str, int] = field(default_factory=dict)
    macs_by_precision: dict[str, int] = field(default_factory=dict)  # "fp32", "w8a8", "w4a8", "w1a1", …

    def to_dict(self) -> dict:
        return {"params": self.params, "param_bytes": self.param_bytes, "macs": self.macs,
                "macs_by_module": dict(sorted(self.macs_by_module.items(), key=lambda kv: -kv[1])),
                "macs_by_precision": dict(sorted(self.macs_by_precision.items()))}


def _float_precision(n: fx.Node) -> str:
    tm = n.meta.get("tensor_meta")
    dtype = getattr(tm, "dtype", None)
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.float64: "fp64"}.get(dtype, str(dtype).removeprefix("torch."))


def analyze(gm: fx.GraphModule, example_inputs: tuple) -> Cost:
    """Parameters read by the graph and MACs on ``example_inputs``."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    costs = {n: qops.cost(n) for n in gm.graph.nodes if n.op == "call_function"}
    values = {}  # get_attr node → logical values, where an op says it is stored packed
    for n, c in costs.items():
        for index, count in (c.operand_values if c is not None else ()):
            values[n.args[index]] = count
    seen, params, nbytes = set(), 0, 0
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in seen:
            seen.add(n.target)
            t = gm
            for part in n.target.split("."):
                t = getattr(t, part)
            if isinstance(t, torch.Tensor) and t.dtype != torch.int64:  # skip counters like num_batches_tracked
                params += values.get(n, t.numel())
                nbytes += t.numel() * t.element_size()
    macs, by_module, by_precision = 0, {}, {}
    for n, c in costs.items():
        rule = MAC_RULES.get(n.target)
        if c is not None:
            m, precision = c.macs, c.precision
        elif rule is not None:
            m, precision = int(rule(n)), _float_precision(n)
        else:
            continue
        if m:
            macs += m
            key = node_module(n) or n.name
            by_module[key] = by_module.get(key, 0) + m
            by_precision[precision] = by_precision.get(precision, 0) + m
    return Cost(params, nbytes, macs, by_module, by_precision)
