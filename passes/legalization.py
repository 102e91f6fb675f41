"""Fit a captured graph to the target's operator set: legalize, then list what still does not fit.

After the default passes, `run_legalization` runs the legalization passes (exact rewrites, then —
only with ``approximate=True`` — declared approximations; each pass documents its numerics
contract) and checks every remaining node against ``spec.ops``. `compile` raises
`OperatorSetError` (`raise_if_unfit`) before anything is built, listing every node that still does
not fit with its source line and the rewrite that would be needed; `graphopt.check` returns the
same facts instead. Targets whose set is unrestricted (host, Cortex-A, armv7) skip legalization.
"""
from __future__ import annotations

from torch import fx

from graphopt.errors import OperatorSetError, Unsupported
from graphopt.ops import op_kind
from graphopt.passes.base import GraphPass, PassContext
from graphopt.passes.manager import PassManager, PassRecord
from graphopt.source import node_source
from graphopt.targets.opset import OperatorSet
from graphopt.targets.spec import TargetSpec


def legalization_passes(approximate: bool = False) -> list[GraphPass]:
    """Exact rewrites first, approximations (declined unless ``approximate``) before the structural ones."""
    from graphopt.passes.approximate_activations import ApproximateActivations
    from graphopt.passes.dead_code import DeadCodeElimination
    from graphopt.passes.legalize_activations import LegalizeActivations
    from graphopt.passes.legalize_attention import LegalizeAttention
    from graphopt.passes.legalize_conv import LegalizeConv
    from graphopt.passes.legalize_linear import LegalizeLinear
    from graphopt.passes.legalize_norm import LegalizeNorm
    from graphopt.passes.legalize_pool import LegalizePool

    return [LegalizeActivations(), ApproximateActivations(approximate), LegalizeNorm(), LegalizeAttention(),
            LegalizePool(), LegalizeLinear(), LegalizeConv(), DeadCodeElimination()]


def _hint(node: fx.Node, reason: str, ops: OperatorSet, declines: dict,
          passes: list[GraphPass] | tuple[GraphPass, ...]) -> str:
    """The rewrite that would make ``node`` fit, as precisely as graphopt knows it."""
    if node.name in declines:
        return declines[node.name]
    if " tensors (" in reason:
        return "cast the model to a dtype the target runs (e.g. model.float()), or quantize it (graphopt.quantize)"
    if "rank-" in reason:
        return f"reshape to rank ≤ {ops.max_rank} around this op in the model"
    known = [r for p in passes for r in getattr(p, "REWRITES", ()) if node.target in r.ops]
    missing = [f"{r.name} (needs {', '.join(k for k in r.emits if not ops.has(k))})"
               for r in known if not ops.has(*r.emits)]
    if missing:
        return "graphopt can rewrite it as " + "; or ".join(missing) + f" — not in the {ops.name} set"
    if known:
        return "graphopt's rewrites for it do not apply to these arguments (" + \
               "; ".join(r.algebra for r in known) + "); change the layer in the model"
    return f"no graphopt rewrite produces {op_kind(node)} from {ops.name} ops; replace it in the model, " \
           "or register a target whose operator set has it"


def unfit_nodes(gm: fx.GraphModule, ops: OperatorSet, records: list[PassRecord] | tuple = (),
                passes: list[GraphPass] | tuple = ()) -> list[Unsupported]:
    """Every node ``ops`` rejects, with its source line and the rewrite that would be needed."""
    declines = {d.node: d.reason for r in records for d in r.declined}
    items = []
    for node in gm.graph.nodes:
        reason = ops.violation(node, gm)
        if reason:
            items.append(Unsupported(f"{node.name}: {reason}", node_source(node),
                                     _hint(node, reason, ops, declines, passes)))
    return items


def run_legalization(gm: fx.GraphModule, ctx: PassContext, *, approximate: bool = False, verify: bool = False,
                     rtol: float = 1e-4) -> tuple[fx.GraphModule, list[PassRecord], list[dict], list[Unsupported]]:
    """(graph, pass records, legalized rewrites, nodes that still do not fit) for ``ctx.target.ops``.

    Per-node rewrite records move from the passes' stats into the returned ``legalized`` list:
    dicts with node, where, rewrite, exact and max_error (measured for approximations, 0 if exact).
    """
    ops = ctx.target.ops if isinstance(ctx.target, TargetSpec) else None
    if ops is None or ops.unrestricted:
        return gm, [], [], []
    passes = legalization_passes(approximate)
    gm, records = PassManager(passes, verify=verify, rtol=rtol).run(gm, ctx)
    legalized = [{k: rec[k] for k in ("node", "where", "rewrite", "exact", "max_error")}
                 for r in records for rec in r.stats.pop("nodes", {}).values()]
    return gm, records, legalized, unfit_nodes(gm, ops, records, passes)


def raise_if_unfit(unfit: list[Unsupported], model: str, spec: TargetSpec) -> None:
    if unfit:
        raise OperatorSetError(
            f"{len(unfit)} node(s) of {model} do not fit the {spec.ops.name} operator set of {spec.name}:", unfit,
            f"Nothing was built. `graphopt targets --ops {spec.name}` lists the operator set; "
            "graphopt.check(model, example_inputs, target=...) shows the full dry run.")
