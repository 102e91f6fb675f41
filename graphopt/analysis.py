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
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from graphopt import qops
from graphopt.pipeline import GraphRun
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


class _ShapeProp(GraphRun):
    """`GraphRun` that records each node's ``tensor_meta`` as fx's ShapeProp does."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        tensors = []

        def meta(o):
            if isinstance(o, torch.Tensor):
                tensors.append(o)
                return _extract_tensor_metadata(o)
            return o

        metas = map_aggregate(result, meta)
        if tensors:
            n.meta["tensor_meta"] = metas
        return result


def analyze(gm: fx.GraphModule, example_inputs: tuple) -> Cost:
    """Parameters read by the graph and MACs on ``example_inputs``. A graph that does not run on
    them is a `PassError` naming the node and its source line."""
    with torch.no_grad():
        _ShapeProp(gm, "the graph does not run on the example inputs (a graphopt bug when the model itself "
                        "does: please report it with the model)").run(*example_inputs)
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


def _reachable(starts: list[fx.Node], step) -> set[fx.Node]:
    """Nodes reached from `starts` (not counting the starts themselves) by repeatedly following `step`."""
    seen: set[fx.Node] = set()
    todo = list(starts)
    while todo:
        for m in step(todo.pop()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def float_ops_in_quantized(gm: fx.GraphModule, example_inputs: tuple) -> dict[str, int]:
    """fp32 ops a quantized graph still computes between a dequantize and a quantize (what QDQ
    folding left in float), counted by ATen op name. Ops before the first quantize or after the
    last dequantize (float inputs, float heads) are not counted."""
    qd = torch.ops.quantized_decomposed
    quant = {qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor, torch.ops.graphopt.quantize_sign.default}
    dequant = {qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor, qd.dequantize_per_channel.default}
    with torch.no_grad():
        _ShapeProp(gm, "the quantized graph does not run on the example inputs").run(*example_inputs)
    downstream = _reachable([n for n in gm.graph.nodes if n.target in dequant], lambda n: n.users)
    upstream = _reachable([n for n in gm.graph.nodes if n.target in quant], lambda n: n.all_input_nodes)
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if (n in downstream and n in upstream and n.op == "call_function" and n.target not in quant | dequant
                and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"
                and hasattr(tm, "dtype") and tm.dtype.is_floating_point):
            name = n.target._schema.name.split("::")[1]
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
