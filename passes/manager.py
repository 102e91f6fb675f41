"""`PassManager`: runs fx passes in order, checks their declared requirements, optionally checks
numerics after each pass, and records per-pass time, stats and declines.

Refuses: ``passes`` that are not a list of `GraphPass` instances and a non-positive ``rtol``
(`ConfigError`), a pass whose requirements no earlier pass (or capture) established — `PassError` names
the missing property — and, with ``verify=True``, a pass that moves the outputs beyond tolerance
(`NumericsError` names the pass and the error). A pass that crashes, or leaves a graph that no
longer runs, is a `PassError` naming the pass and the node with the user's source line.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
from torch import fx

from graphopt.errors import ConfigError, GraphoptError, NumericsError, PassError, first_line
from graphopt.passes.base import Decline, GraphPass, PassContext
from graphopt.source import node_source


@dataclass(frozen=True)
class PassRecord:
    name: str
    modified: bool
    seconds: float
    stats: dict = field(default_factory=dict)
    declined: tuple[Decline, ...] = ()
    max_rel_error: float | None = None  # vs. the captured graph, when verified

    def to_dict(self) -> dict:
        return {"name": self.name, "modified": self.modified, "seconds": round(self.seconds, 4),
                "stats": self.stats, "declined": [d.to_dict() for d in self.declined],
                "max_rel_error": self.max_rel_error}


def flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_outputs(o)]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_outputs(v)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return flat_outputs(out.to_tuple())
    return []


def max_rel_error(got, want) -> float:
    """max |got − want| / max(|want|, tiny), over all outputs: error relative to output scale."""
    err = 0.0
    for g, w in zip(flat_outputs(got), flat_outputs(want), strict=True):
        g, w = g.detach().double(), w.detach().double()
        scale = max(w.abs().max().item(), 1e-12) if w.numel() else 1.0
        err = max(err, (g - w).abs().max().item() / scale if w.numel() else 0.0)
    return err


class GraphRun(fx.Interpreter):
    """Runs a GraphModule node by node; a node that raises becomes a `PassError` saying ``what``
    failed, at which node and user source line."""

    def __init__(self, gm: fx.GraphModule, what: str):
        super().__init__(gm)
        self.what = what
        self.extra_traceback = False  # the error names the node and source line itself

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except GraphoptError:
            raise
        except Exception as exc:
            raise PassError(f"{self.what}: node {n.name} ({n.target}) at {node_source(n)} raised "
                            f"{first_line(exc)}") from exc


def run_graph(gm: fx.GraphModule, args: tuple, what: str):
    """``gm(*args)`` without autograd, with failures reported as in `GraphRun`."""
    with torch.no_grad():
        return GraphRun(gm, what).run(*args)


class PassManager:
    def __init__(self, passes: list[GraphPass], *, verify: bool = False, rtol: float = 1e-4):
        if isinstance(passes, (str, GraphPass)) or not isinstance(passes, (list, tuple)):
            raise ConfigError(f"passes must be a list of graphopt pass instances (e.g. graphopt.default_passes()), "
                              f"got {type(passes).__name__}")
        bad = [p for p in passes if not isinstance(p, GraphPass)]
        if bad:
            raise ConfigError(f"passes {bad!r} are not graphopt pass instances; pass objects such as "
                              "graphopt.passes.fold_batchnorm.FoldBatchNorm() (instances, not classes)")
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
            raise ConfigError(f"rtol={rtol!r} must be a positive number, e.g. rtol=1e-4")
        self.passes = list(passes)
        self.verify = verify
        self.rtol = rtol

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, list[PassRecord]]:
        self._check_requirements(ctx.properties)
        reference = self._evaluate(gm, ctx, "the graph given to the passes does not run") if self.verify else None
        records = []
        for p in self.passes:
            t0 = time.perf_counter()
            result = self._run_pass(p, gm, ctx)
            seconds = time.perf_counter() - t0
            gm = result.graph_module
            ctx.properties |= p.establishes
            err = None
            if reference is not None:
                err = max_rel_error(self._evaluate(gm, ctx, f"after pass {p.name}, the graph no longer runs "
                                                            "(a graphopt bug: please report it with the model; "
                                                            "meanwhile leave the pass out)"), reference)
                if p.exact and err > self.rtol:
                    raise NumericsError(f"pass {p.name} changed the outputs by {err:.3g} (relative to output "
                                        f"scale; tolerance {self.rtol:g}). This is a graphopt bug: please report it "
                                        f"with the model; meanwhile disable the pass.")
            records.append(PassRecord(p.name, result.modified, seconds, dict(result.stats), result.declined, err))
        return gm, records

    def _check_requirements(self, have: set[str]) -> None:
        established = set(have)
        for p in self.passes:
            missing = p.requires - established
            if missing:
                providers = {m: [q.name for q in self.passes if m in q.establishes] for m in missing}
                raise PassError(f"pass {p.name} requires {sorted(missing)}, which nothing before it establishes "
                                f"(passes that do: {providers}). Reorder the pipeline or capture with "
                                "graphopt.capture.")
            established |= p.establishes

    @staticmethod
    def _run_pass(p: GraphPass, gm: fx.GraphModule, ctx: PassContext):
        nodes = {n.name: n for n in gm.graph.nodes}  # before the pass: a crash may have erased some
        try:
            return p.run(gm, ctx)
        except GraphoptError:
            raise
        except Exception as exc:
            named = [nodes[m] for m in re.findall(r"\w+", str(exc)) if m in nodes]
            where = f" at node {named[0].name} ({node_source(named[0])})" if named else ""
            raise PassError(f"pass {p.name} failed{where}: {first_line(exc)}. This is a graphopt bug: please "
                            "report it with the model; meanwhile leave the pass out (compile(passes=[...]))") from exc

    @staticmethod
    def _evaluate(gm: fx.GraphModule, ctx: PassContext, what: str):
        return run_graph(gm, ctx.example_inputs, what)


def default_passes() -> list[GraphPass]:
    """The inference clean-up pipeline every compile runs (QDQ folding is a no-op on float graphs)."""
    from graphopt.passes.dead_code import DeadCodeElimination
    from graphopt.passes.fold_batchnorm import FoldBatchNorm
    from graphopt.passes.fold_qdq import FoldQDQ
    from graphopt.passes.remove_identity import RemoveIdentity

    return [RemoveIdentity(), FoldBatchNorm(), FoldQDQ(), DeadCodeElimination()]
