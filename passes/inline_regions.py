"""Inline the context-manager regions torch.export wraps as higher-order ops into the graph around them.

torch.export turns ``with torch.no_grad():`` / ``torch.set_grad_enabled(...)`` blocks into
``wrap_with_set_grad_enabled(enabled, submod, *operands)`` and ``with torch.autocast(...,
enabled=False):`` (timm's EfficientViT attention) into ``wrap_with_autocast(..., False, ...,
submod, *operands)``: a `get_attr` of a GraphModule, called with operands, read back with
``getitem``. Other passes see neither the ops inside nor their parameters. Inlining is exact for
both at inference: grad mode does not change values, and a disabled-autocast region inside no
enabled one computes what its ops compute (graphopt compiles without autocast; only regions at
the top level are inlined, so a region nested in a kept one stays inside it).

Declined, with the reason: enabled autocast regions (their ops would run in reduced precision),
and regions whose results are read other than by index. Every other higher-order op (``cond``,
``while_loop``, ``map``) stays: its branch modules remain referenced by their `get_attr` nodes.
"""
from __future__ import annotations

import operator
import re
from typing import Any

import torch
from torch import fx

from graphopt.passes.base import Decline, GraphPass, PassContext, PassResult, Property
from graphopt.passes.graph import get_attr_value
from graphopt.source import node_source

_hop = torch.ops.higher_order
# op → (index of the submodule argument, function of the args saying why it is not exact to inline, or None)
_REGIONS = {
    _hop.wrap_with_set_grad_enabled: (1, lambda args: None),
    _hop.wrap_with_autocast: (4, lambda args: None if args[2] is False else
                              f"torch.autocast({args[0]!r}, dtype={args[1]}) region: its ops run in reduced "
                              "precision, which graphopt does not compile; disable autocast in the model"),
}


def _fresh(gm: fx.GraphModule, hint: str) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]", "_", hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _body(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule | None:
    """The GraphModule a region node calls, or None."""
    sub_node = node.args[_REGIONS[node.target][0]]
    if not (isinstance(sub_node, fx.Node) and sub_node.op == "get_attr"):
        return None
    sub = get_attr_value(gm, sub_node.target)
    return sub if isinstance(sub, fx.GraphModule) else None


def _region_source(gm: fx.GraphModule, node: fx.Node) -> str:
    """Where the region is in the user's code: the first op inside it with a source line (the
    higher-order op itself carries none)."""
    sub = _body(gm, node)
    inner = [n for n in sub.graph.nodes if n.meta.get("stack_trace")] if sub is not None else []
    return node_source(inner[0] if inner else node)


class InlineRegions(GraphPass):
    name = "inline-regions"
    requires = frozenset({Property.ATEN})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        inlined: dict[str, int] = {}
        declined: dict[fx.Node, Decline] = {}
        while True:  # inlining a region brings the regions nested in it to the top level
            node = next((n for n in graph.nodes if n.op == "call_function" and n.target in _REGIONS
                         and n not in declined), None)
            if node is None:
                break
            reason = self._why_not(gm, node)
            if reason:
                declined[node] = Decline(self.name, node.name, _region_source(gm, node), reason)
                continue
            self._inline(gm, node)
            inlined[node.target.__name__] = inlined.get(node.target.__name__, 0) + 1
        if inlined:
            graph.lint()
            gm.recompile()
        return PassResult(gm, bool(inlined), {"inlined": sum(inlined.values()), "by_op": inlined},
                          tuple(declined.values()))

    @staticmethod
    def _why_not(gm: fx.GraphModule, node: fx.Node) -> str | None:
        index, inexact = _REGIONS[node.target]
        reason = inexact(node.args)
        if reason:
            return reason
        sub = _body(gm, node)
        if sub is None:
            return "the region's body is not a GraphModule of the graph"
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
        if len(placeholders) != len(node.args) - index - 1 or not isinstance(out, (tuple, list)):
            return "the region's body does not take its operands and return a tuple"
        if any(u.target is not operator.getitem for u in node.users):
            return "the region's results are read other than by index"
        return None

    @staticmethod
    def _inline(gm: fx.GraphModule, node: fx.Node) -> None:
        graph = gm.graph
        index, _ = _REGIONS[node.target]
        sub_node, operands = node.args[index], node.args[index + 1:]
        sub = _body(gm, node)
        if sub is None:  # `_declined` refused these regions before
            raise ValueError(f"{node.name}: the region's body is not a GraphModule of the graph")
        placeholders = (n for n in sub.graph.nodes if n.op == "placeholder")
        env: dict[fx.Node, Any] = dict(zip(placeholders, operands, strict=False))
        with graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op in ("placeholder", "output"):
                    continue
                if n.op == "get_attr":  # nested regions, constants: moved to the outer module
                    name = _fresh(gm, n.target)
                    value = get_attr_value(sub, n.target)
                    if isinstance(value, torch.nn.Module):
                        gm.add_module(name, value)
                    elif isinstance(value, torch.nn.Parameter):
                        gm.register_parameter(name, value)
                    else:
                        gm.register_buffer(name, value)
                    env[n] = graph.get_attr(name)
                    env[n].meta = dict(n.meta)
                else:
                    env[n] = graph.node_copy(n, lambda a: env[a])
        out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
        results = fx.node.map_arg(out, lambda a: env[a])
        for user in list(node.users):
            user.replace_all_uses_with(results[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not sub_node.users:
            graph.erase_node(sub_node)
        if not any(n.op == "get_attr" and n.target == sub_node.target for n in graph.nodes):
            owner, _, attr = sub_node.target.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
