"""Shared machinery of the legalization passes (`passes/legalize_*.py`, `passes/approximate_activations.py`).

A `Rewrite` is data: the ops it replaces, the op kinds it emits, a one-line algebra, a predicate
saying whether a node needs it, and a builder written against an emitter. The same builder runs
on a `GraphEmitter` (new fx nodes before the rewritten node, with its source location and shape
metadata) or a `TensorEmitter` (plain tensors: how tests and the approximation error measurement
evaluate exactly the ops the graph will run).

`LegalizePass.run` rewrites only nodes the target's operator set rejects for their kind or
constraints (a dtype or rank no rewrite here changes is left alone), with the first rewrite
whose emitted kinds the set admits; new nodes go back on the worklist, so rewrites compose (a
grouped dilated conv is split, then each part densified). A node left unfit is not an error
here: `graphopt.passes.legalization` lists every such node at the end.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphopt.passes.base import Decline, GraphPass, PassContext, PassResult, Property
from graphopt.passes.graph import add_constant, constant_of
from graphopt.source import node_source
from graphopt.targets.opset import EVERYTHING, OperatorSet

_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node")


class TensorEmitter:
    """Evaluates a builder on tensors (``ops``: the operator set builders may consult)."""

    def __init__(self, ops: OperatorSet = EVERYTHING):
        self.ops = ops

    def call(self, op, *args, **kwargs):
        return op(*args, **kwargs)

    def const(self, hint: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def value(self, a) -> torch.Tensor | None:
        return a if isinstance(a, torch.Tensor) else None

    def meta(self, a) -> torch.Tensor:
        return a


def _as_meta(a):
    if isinstance(a, fx.Node):
        a = a.meta["val"]
    if isinstance(a, torch.Tensor):
        return torch.empty(a.shape, dtype=a.dtype, device="meta")
    return a


class GraphEmitter:
    """Emits a builder's ops as fx nodes before ``at``, carrying its source location."""

    def __init__(self, gm: fx.GraphModule, at: fx.Node, ops: OperatorSet):
        self.gm, self.at, self.ops = gm, at, ops
        self.new: list[fx.Node] = []

    def _place(self, node: fx.Node, val) -> fx.Node:
        node.meta["val"] = val
        for key in _COPIED_META:
            if key in self.at.meta:
                node.meta[key] = self.at.meta[key]
        self.new.append(node)
        return node

    def call(self, op, *args, **kwargs) -> fx.Node:
        val = op(*fx.node.map_aggregate(args, _as_meta), **fx.node.map_aggregate(kwargs, _as_meta))
        with self.gm.graph.inserting_before(self.at):
            node = self.gm.graph.call_function(op, args, kwargs)
        return self._place(node, val)

    def const(self, hint: str, value: torch.Tensor) -> fx.Node:
        node = add_constant(self.gm, f"{self.at.name}_{hint}", value, before=self.at)
        return self._place(node, torch.empty(value.shape, dtype=value.dtype, device="meta"))

    def value(self, a) -> torch.Tensor | None:
        return constant_of(self.gm, a)

    def meta(self, a) -> torch.Tensor:
        return a.meta["val"] if isinstance(a, fx.Node) else a


@dataclass(frozen=True)
class Rewrite:
    """One legalization rule (see the module docstring).

    needed(node, gm, ops) -> str | None: why this rewrite applies (None: it does not).
    build(emitter, args, kwargs) -> the replacement value, from the node's args.
    reference: float64 function an approximation stands for (None for exact rewrites).
    """

    ops: tuple
    name: str
    emits: tuple[str, ...]
    algebra: str
    needed: Callable
    build: Callable
    declared_error: float = 0.0  # bound on |approx − exact| / max(1, |exact|); 0 for exact rewrites
    reference: Callable | None = None


def unfit(node: fx.Node, gm: fx.GraphModule, ops: OperatorSet) -> str | None:
    """The common `Rewrite.needed`: the node's own operator-set violation."""
    return ops.violation(node, gm, tensors=False)


class LegalizePass(GraphPass):
    """Base of the legalization passes: subclasses set ``name`` and ``REWRITES``."""

    requires = frozenset({Property.ATEN, Property.INFERENCE})
    REWRITES: ClassVar[tuple[Rewrite, ...]] = ()

    def max_error(self, rewrite: Rewrite) -> float:
        """The error the report states for ``rewrite`` (exact rewrites: 0)."""
        return 0.0

    def decline(self, rewrite: Rewrite, node: fx.Node, reason: str) -> str | None:
        """A reason to refuse an applicable rewrite (e.g. approximations not allowed), or None."""
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ops: OperatorSet = getattr(ctx.target, "ops", EVERYTHING)
        by_op: dict = {}
        for r in self.REWRITES:
            for op in r.ops:
                by_op.setdefault(op, []).append(r)
        records, declined = {}, []
        work = deque(n for n in gm.graph.nodes if n.target in by_op)
        while work:
            node = work.popleft()
            if ops.violation(node, gm, tensors=False) is None:
                continue
            rewrite, reason = next(((r, why) for r in by_op.get(node.target, ())
                                    if ops.has(*r.emits) and (why := r.needed(node, gm, ops))), (None, None))
            if rewrite is None:
                continue
            refusal = self.decline(rewrite, node, reason or "")
            if refusal:
                declined.append(Decline.at(self.name, node, refusal))
                continue
            e = GraphEmitter(gm, node, ops)
            out = rewrite.build(e, node.args, node.kwargs)
            records[node.name] = {"node": node.name, "where": node_source(node), "rewrite": rewrite.name,
                                  "reason": reason, "algebra": rewrite.algebra, "exact": rewrite.declared_error == 0,
                                  "max_error": self.max_error(rewrite)}
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            work.extendleft(n for n in reversed(e.new) if n.target in by_op)
        if records:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        by_rewrite: dict[str, int] = {}
        for rec in records.values():
            by_rewrite[rec["rewrite"]] = by_rewrite.get(rec["rewrite"], 0) + 1
        return PassResult(gm, bool(records), {"rewritten": len(records), "by_rewrite": by_rewrite,
                                              "nodes": records}, tuple(declined))
