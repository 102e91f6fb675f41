"""The per-op oracle of the quantized numerics contract: every folded op against its own QDQ form,
fed the same int8 inputs (teacher forcing), so differences do not accumulate across layers.

`fold(qm, args)` captures a QDQ module and folds it like `graphopt.to_integer`, keeping the graph
before folding; `per_op_steps(pre, ig, args)` runs the integer graph, then the QDQ graph with each
folded quantize node's output replaced by the integer graph's value (FoldQDQ records the quantize
node a value replaces in ``meta["folded_from"]``) and returns, per folded node, its op kind and the
largest and mean |QDQ − integer| in output steps.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphopt.passes.base import PassContext, PassResult, Property
from graphopt.passes.fold_qdq import CLAMPS, FoldQDQ, producer

# kinds whose integer form is exact against their QDQ form (lookup tables, clamps, data movement)
EXACT = {"hardswish", "hardsigmoid", "sigmoid", "tanh", "gelu", "silu", "elu", "leaky_relu", "relu", "relu6",
         "hardtanh", "clamp", "max_pool2d", "view", "reshape", "flatten", "permute", "transpose", "clone",
         "contiguous", "slice", "getitem", "unsqueeze", "squeeze", "_unsafe_view"}


@dataclass(frozen=True)
class OpSteps:
    kind: str  # the op folded (with a fused clamp: "conv2d+relu")
    max_steps: int
    differing: float  # fraction of output elements that differ
    exact_form: bool  # a lookup table, clamp or pure data movement (no rescale)


def fold(qm: fx.GraphModule, args: tuple) -> tuple[fx.GraphModule, PassResult]:
    """(the QDQ graph, FoldQDQ's result on a copy of it). `graphopt.quantize` returns an ATen-level
    graph already; shapes are propagated on ``args`` instead of re-exporting it (what
    `graphopt.to_integer` does, at ~1 s a graph)."""
    pre = copy.deepcopy(qm)
    FakeTensorProp(pre, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*args)
    return pre, FoldQDQ().run(copy.deepcopy(pre), PassContext(args, None, {Property.ATEN}))


def _kind(q: fx.Node) -> str:
    p = producer(q.args[0])
    name = p.target.__name__.split(".")[0]
    if p.target in CLAMPS and producer(p.args[0]) is not None and not producer(p.args[0]).target.__name__.startswith(
            "dequantize"):
        return producer(p.args[0]).target.__name__.split(".")[0] + "+" + name
    return name


def _exact_form(node: fx.Node) -> bool:
    """The folded value comes without a requantize/qadd (a table, clamp or data movement chain)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.op != "call_function":
            continue
        name = getattr(n.target, "__name__", "")
        if name.startswith(("requantize", "qadd")):
            return False
        if name.startswith(("qlut", "dequantize")):
            continue
        stack += [a for a in n.all_input_nodes if "folded_from" not in a.meta]
    return True


def per_op_steps(pre: fx.GraphModule, ig: fx.GraphModule, args: tuple) -> list[OpSteps]:
    values = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = super().run_node(n)
            return values[n.name]

    Record(ig).run(*args)
    folded = {n.meta["folded_from"]: n for n in ig.graph.nodes if "folded_from" in n.meta}
    found: list[OpSteps] = []

    class Forced(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            node = folded.get(n.name)
            if node is None:
                return v
            forced = values[node.name]
            d = (v.to(torch.int64) - forced.to(torch.int64)).abs()
            found.append(OpSteps(_kind(n), int(d.max()) if d.numel() else 0, float((d > 0).double().mean()),
                                 _exact_form(node)))
            return forced

    Forced(pre).run(*args)
    return found
