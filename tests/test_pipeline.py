"""One pipeline for compile, check and tune: each graph is exported once and shape-propagated once.

Counted, not timed: every ``torch.export.export`` call (by what it exports: the user's model, the
pruned copy, the rewritten GraphModule for lowering) and every shape propagation (graphopt's own
and torch.fx's ShapeProp), on real compiles for the host.
"""
from __future__ import annotations

import collections
import logging
import subprocess
import sys

import pytest
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

import graphopt
import graphopt.passes.analysis as analysis
from graphopt.passes.pipeline import Pipeline
from graphopt.tuning import exported_for_tuning
from graphopt.zoo import ZOO


@pytest.fixture
def counts(monkeypatch):
    seen: collections.Counter = collections.Counter()
    export, run, propagate = torch.export.export, analysis._ShapeProp.run, ShapeProp.propagate

    def counting_export(model, *args, **kwargs):
        seen["export graph" if isinstance(model, fx.GraphModule) else f"export {type(model).__name__}"] += 1
        return export(model, *args, **kwargs)

    def counting_run(self, *args, **kwargs):
        seen["shape propagation"] += 1
        return run(self, *args, **kwargs)

    def counting_propagate(self, *args):
        seen["shape propagation"] += 1
        return propagate(self, *args)

    monkeypatch.setattr(torch.export, "export", counting_export)
    monkeypatch.setattr(analysis._ShapeProp, "run", counting_run)
    monkeypatch.setattr(ShapeProp, "propagate", counting_propagate)
    return seen


def test_compile_with_pruning_exports_each_graph_once_and_propagates_shapes_once(counts):
    model, args = ZOO["residual_cnn"].factory()
    with pytest.warns(graphopt.GraphoptWarning):  # the budget is below what the channel steps reach
        cm = graphopt.compile(model, args, "host", prune=graphopt.PruneConfig(target_macs=0.5), progress=False)
    name = type(model).__name__
    # the original (channel groups), the pruned copy (compile's capture, also prune's after-cost), lowering
    assert counts == {f"export {name}": 2, "export graph": 1, "shape propagation": 1}
    pruned_cost = cm.report.pruning["macs"]
    assert pruned_cost["after"] == cm.report.macs_before < pruned_cost["before"]
    assert set(cm.report.timings) >= {"prune", "capture", "passes", "export", "lower and build"}


def test_check_and_tune_run_the_same_stages_once(counts):
    model, args = ZOO["plain_cnn"].factory()
    spec = graphopt.get_target("cortex-m4")  # a restricted operator set: legalization runs too
    result = graphopt.check(model, args, spec)
    assert result.fits
    assert counts == {f"export {type(model).__name__}": 1, "export graph": 1}
    counts.clear()
    ep = exported_for_tuning(model, args, graphopt.get_target("host"))
    assert isinstance(ep, torch.export.ExportedProgram)
    assert counts == {f"export {type(model).__name__}": 1, "export graph": 1}


def test_stages_are_cached_and_costs_match_a_shape_propagation(counts):
    model, args = ZOO["residual_cnn"].factory()
    pipe = Pipeline(model.eval(), args, graphopt.get_target("host"))
    assert pipe.exported is pipe.exported and pipe.legalized is pipe.legalized
    before = pipe.cost_before  # from the shapes export recorded: nothing ran
    assert counts["shape propagation"] == 0
    assert pipe.cost_after is pipe.cost_after
    assert counts["shape propagation"] == 1
    fresh = graphopt.capture(model, args).graph_module
    assert analysis.analyze(fresh, args).to_dict() == before.to_dict()  # the same numbers a run gives
    assert pipe.cost_after.macs == before.macs  # BN folding moves no MACs


def test_progress_is_logged_when_asked_and_silent_otherwise(caplog):
    """One mechanism: log records on the ``graphopt`` logger; ``progress=False`` silences them even
    where logging is set to INFO."""
    caplog.set_level(logging.INFO)
    model, args = ZOO["plain_cnn"].factory()
    graphopt.compile(model, args, "host", progress=False)
    assert not [r for r in caplog.records if r.name.startswith("graphopt")]
    graphopt.compile(model, args, "host", progress=True)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("graphopt")]
    assert {"capture ...", "passes ...", "export ...", "lower and build for host ..."} <= set(messages)
    assert "  import" in messages  # the lowering phases, from the one phase runner


def test_a_plain_script_sees_progress_on_stderr():
    code = ("from graphopt import progress\n"
            "with progress.shown(True), progress.phase('step', 'for x'):\n    pass\n"
            "with progress.shown(False), progress.phase('hidden'):\n    pass\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.splitlines()[0] == "[graphopt] step for x ..." and "step done in" in err
    assert "hidden" not in err
