"""Static cost model of a captured graph: parameters, MACs per op, per module and per precision.

MACs (multiply-accumulates) are counted for the ops that dominate compute — convolutions,
linear/matmul family, attention — by `graphopt.ops.op_cost`, from the shapes on the nodes.
Elementwise work is not counted (it is reported as zero, by convention of the field). graphopt's
integer ops state their own cost (`graphopt.qops`): MACs, the weight × activation precision they
run at (``w8a8``, ``w4a8``, ``w1a1`` …) and the weight count of packed low-bit operands, so params
count weights, not bytes, while param_bytes is what is stored.

`cost(gm)` reads the shapes a graph already carries (a fresh capture's ``val``) and runs nothing;
`analyze(gm, args)` first propagates shapes by running the graph once (`propagate_shapes`: after
passes rewrote it), which also proves it still runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from graphopt import ops
from graphopt.passes.manager import GraphRun
from graphopt.source import node_module


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


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``gm`` once on ``example_inputs``, recording every node's ``tensor_meta``. A graph that does
    not run on them is a `PassError` naming the node and its source line."""
    with torch.no_grad():
        _ShapeProp(gm, "the graph does not run on the example inputs (a graphopt bug when the model itself "
                        "does: please report it with the model)").run(*example_inputs)


def analyze(gm: fx.GraphModule, example_inputs: tuple) -> Cost:
    """Parameters read by the graph and MACs on ``example_inputs`` (shapes propagated first)."""
    propagate_shapes(gm, example_inputs)
    return cost(gm, example_inputs)


def cost(gm: fx.GraphModule, example_inputs: tuple) -> Cost:
    """Parameters read by the graph and MACs from the shapes its nodes carry; only a graph where some
    MAC-counted node lacks them is run (`propagate_shapes`) first."""
    if any(ops.counts_macs(n) and any(ops.shape(a) is None for a in (n, *n.all_input_nodes))
           for n in gm.graph.nodes):
        propagate_shapes(gm, example_inputs)
    costs = {n: ops.op_cost(n) for n in gm.graph.nodes if n.op == "call_function"}
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
    macs, by_module, by_precision = 0, dict[str, int](), dict[str, int]()
    for n, c in costs.items():
        if c is not None and c.macs:
            macs += c.macs
            key = node_module(n) or n.name
            by_module[key] = by_module.get(key, 0) + c.macs
            by_precision[c.precision] = by_precision.get(c.precision, 0) + c.macs
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
