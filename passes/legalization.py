"""Fit a captured graph to the target's operator set: legalize, then check; `graphopt.check` as a dry run.

After the default passes, `legalize` runs the legalization passes (exact rewrites, then — only
with ``approximate=True`` — declared approximations; each pass documents its numerics contract)
and checks every remaining node against ``spec.ops``. `compile` raises `OperatorSetError` before
anything is built, listing every node that still does not fit with its source line and the
rewrite that would be needed; `check` returns the same facts as a `CheckResult` instead.
Targets whose set is unrestricted (host, Cortex-A, armv7) skip legalization entirely.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from graphopt.errors import OperatorSetError, Unsupported
from graphopt.passes.base import GraphPass, PassContext, Property
from graphopt.passes.manager import PassManager, PassRecord
from graphopt.source import node_source
from graphopt.targets import TargetSpec, get_target
from graphopt.ops import DATA_MOVEMENT, op_kind
from graphopt.targets.opset import OperatorSet


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


def _hint(node: fx.Node, reason: str, ops: OperatorSet, declines: dict, passes: list[GraphPass]) -> str:
    """The rewrite that would make ``node`` fit, as precisely as graphopt knows it."""
    if node.name in declines:
        return declines[node.name]
    if " tensors (" in reason:
        return "cast the model to a dtype the target runs (e.g. model.float()), or quantize it (graphopt.quantize)"
    if "rank-" in reason:
        return "reshape to rank ≤ {} around this op in the model".format(ops.max_rank)
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


def unfit_nodes(gm: fx.GraphModule, ops: OperatorSet, records: list[PassRecord] = (),
                passes: list[GraphPass] = ()) -> list[Unsupported]:
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
    ops = ctx.target.ops
    if ops.unrestricted:
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


@dataclass
class CheckResult:
    """`graphopt.check`'s answer: what runs as is, what would change, and what cannot run."""

    model: str
    target: str
    ops: str
    approximate: bool
    kinds: dict = field(default_factory=dict)  # op kind -> count in the legalized graph (what would run)
    legalized: list = field(default_factory=list)  # rewrites compile would make (dicts as in Report.legalized)
    unsupported: list = field(default_factory=list)  # Unsupported items: nodes that cannot run

    @property
    def fits(self) -> bool:
        return not self.unsupported

    @property
    def approximations(self) -> list:
        return [r for r in self.legalized if not r["exact"]]

    def to_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "ops": self.ops, "approximate": self.approximate,
                "fits": self.fits, "kinds": dict(self.kinds), "legalized": list(self.legalized),
                "unsupported": [{"what": u.what, "where": u.where, "hint": u.hint} for u in self.unsupported]}

    def __str__(self) -> str:
        verdict = "fits" if self.fits else f"does NOT fit ({len(self.unsupported)} node(s))"
        lines = [f"{self.model} on {self.target} ({self.ops} operator set, approximate={self.approximate}): {verdict}",
                 "runs: " + (", ".join(f"{k}×{n}" for k, n in sorted(self.kinds.items())) or "-")]
        lines.append(f"would change ({len(self.legalized)}):" if self.legalized else "would change: nothing")
        for r in self.legalized:
            err = "exact" if r["exact"] else f"max error {r['max_error']:.1e}"
            lines.append(f"  - {r['node']}: {r['rewrite']} ({err})  [{r['where']}]")
        if self.unsupported:
            lines.append(f"cannot run ({len(self.unsupported)}):")
            lines += [str(u) for u in self.unsupported]
        return "\n".join(lines)


def check(model: torch.nn.Module, example_inputs, target: str | TargetSpec = "arm", *,
          approximate: bool = False) -> CheckResult:
    """Dry run of compile's graph side for ``target``: capture, default passes, legalization, op-set
    and TVM support checks. Nothing is built; the model is left in the mode it came in."""
    from graphopt.api import _eval_mode
    from graphopt.passes.capture import capture, check_example_inputs, check_model, to_exported_program
    from graphopt.passes.manager import default_passes
    from graphopt.targets.lowering.support import unsupported_ops

    spec = get_target(target)
    check_model(model)
    args = check_example_inputs(example_inputs)
    with _eval_mode(model, []):
        gm = capture(model, args).graph_module
    ctx = PassContext(args, spec, {Property.ATEN, Property.INFERENCE})
    gm, _ = PassManager(default_passes()).run(gm, ctx)
    gm, _, legalized, unfit = run_legalization(gm, ctx, approximate=approximate)
    if not unfit:
        unfit = unsupported_ops(to_exported_program(gm, args).run_decompositions())
    kinds = Counter(k for n in gm.graph.nodes if (k := op_kind(n)) and k not in DATA_MOVEMENT)
    return CheckResult(type(model).__name__, spec.name, spec.ops.name, approximate, dict(kinds), legalized, unfit)
