"""Dead-code elimination: drop nodes whose results are unused and the parameters only they read.

Refuses to remove impure nodes (in-place ops, asserts, RNG with side effects) — fx's own
`is_impure` decides — and never touches placeholders or the output.
"""
from __future__ import annotations

from torch import fx

from graphopt.passes.base import GraphPass, PassContext, PassResult
from graphopt.passes.graph import delete_unused_attributes


class DeadCodeElimination(GraphPass):
    name = "dead-code"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        nodes_removed = before - len(gm.graph.nodes)
        attrs_removed = delete_unused_attributes(gm)
        modified = bool(nodes_removed or attrs_removed)
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified, {"nodes_removed": nodes_removed, "tensors_removed": attrs_removed})
