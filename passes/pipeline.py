"""`Pipeline`: the graph side of compile, check and tune — one object, each stage run once.

    p = Pipeline(model, (x,), spec)   # nothing runs yet; each stage runs on first access, then is kept
    p.captured     # eval mode → capture (torch.export, then symbolic_trace) → canonical form
    p.cost_before  # params / MACs of the captured graph, from the shapes capture recorded (nothing runs)
    p.optimized    # the passes (`default_passes()` unless given), as the graph and their records
    p.legalized    # fitted to ``spec.ops``: rewrites made and the nodes that still do not fit
    p.cost_after   # params / MACs after, from one shape propagation (which proves the graph runs)
    p.exported     # the decomposed ExportedProgram lowering takes (the second and last torch.export)

Passes rewrite the graph in place, so ``captured.graph_module`` is the graph of the latest stage
run; ``cost_before`` is taken before the passes. `graphopt.compile` reads every stage,
`graphopt.check` stops after ``exported`` (listing unfit nodes instead of raising), `graphopt.tune`
needs ``exported``. Each stage logs and times itself
into ``timings`` (``capture``, ``passes``, ``legalize``, ``export``); a model that came in training
mode is captured in eval mode with a warning appended to ``warnings``, and left as it came.
Refuses, before any work: a model that is not an `nn.Module`, example inputs that are not a
non-empty tuple of tensors; then, at capture, what `capture` refuses and a model whose forward
returns no tensor (`InputError`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import fx

from graphopt import progress
from graphopt.errors import InputError, Unsupported
from graphopt.passes.analysis import Cost, analyze, cost
from graphopt.passes.base import GraphPass, PassContext, Property
from graphopt.passes.capture import (
    Captured,
    CaptureMethod,
    capture,
    check_example_inputs,
    check_model,
    eval_mode,
    to_exported_program,
)
from graphopt.passes.legalization import run_legalization
from graphopt.passes.manager import PassManager, PassRecord, default_passes, flat_outputs
from graphopt.targets.spec import TargetSpec


@dataclass
class Stage:
    """A graph and what the passes that made it recorded."""

    graph_module: fx.GraphModule
    records: list[PassRecord] = field(default_factory=list)


@dataclass
class Legalized(Stage):
    """`Stage` after legalization: per-node rewrites (dicts as in `Report.legalized`) and unfit nodes."""

    rewrites: list[dict] = field(default_factory=list)
    unfit: list[Unsupported] = field(default_factory=list)


class Pipeline:
    """See the module docstring."""

    def __init__(self, model: torch.nn.Module, example_inputs, spec: TargetSpec, *,
                 passes: list[GraphPass] | None = None, capture_method: CaptureMethod = CaptureMethod.AUTO,
                 verify: bool = False, rtol: float = 1e-4, approximate: bool = False,
                 timings: dict[str, float] | None = None, warnings: list[str] | None = None):
        check_model(model)
        self.model = model
        self.args = check_example_inputs(example_inputs)
        self.spec = spec
        self.manager = PassManager(default_passes() if passes is None else passes, verify=verify, rtol=rtol)
        self.capture_method, self.verify, self.rtol, self.approximate = capture_method, verify, rtol, approximate
        self.timings = timings if timings is not None else {}
        self.warnings = warnings if warnings is not None else []

    @cached_property
    def captured(self) -> Captured:
        with eval_mode(self.model, self.warnings), progress.phase("capture", timings=self.timings):
            captured = capture(self.model, self.args, self.capture_method)
        if not flat_outputs(captured.outputs):
            raise InputError(f"{type(self.model).__name__} returned no tensor on the example inputs (got "
                             f"{type(captured.outputs).__name__}); graphopt compiles models whose forward returns "
                             "tensors (a tensor, or a tuple/list/dict of them)")
        return captured

    @cached_property
    def cost_before(self) -> Cost:
        return cost(self.captured.graph_module, self.args)

    @cached_property
    def context(self) -> PassContext:
        """What the passes see: example inputs, target, and the properties established so far."""
        return PassContext(self.args, self.spec, {Property.ATEN, Property.INFERENCE} | self.captured.properties)

    @cached_property
    def optimized(self) -> Stage:
        captured = self.captured
        self.cost_before  # noqa: B018  measured on the captured graph, before the passes rewrite it in place
        with progress.phase("passes", timings=self.timings):
            gm, records = self.manager.run(captured.graph_module, self.context)
        return Stage(gm, captured.passes + records)

    @cached_property
    def legalized(self) -> Legalized:
        gm = self.optimized.graph_module
        if self.spec.ops.unrestricted:
            return Legalized(gm)
        with progress.phase("legalize", f"for the {self.spec.ops.name} operator set", timings=self.timings):
            gm, records, rewrites, unfit = run_legalization(gm, self.context, approximate=self.approximate,
                                                            verify=self.verify, rtol=self.rtol)
        return Legalized(gm, records, rewrites, unfit)

    @cached_property
    def cost_after(self) -> Cost:
        return analyze(self.legalized.graph_module, self.args)

    @cached_property
    def exported(self) -> torch.export.ExportedProgram:
        gm = self.legalized.graph_module
        with progress.phase("export", timings=self.timings):
            return to_exported_program(gm, self.args, decompose=True)
