"""The fuzz suite's three paths and their oracles, on bundles of random graphs (tests/fuzzgen.py).

One TVM build checks many graphs: a `Bundle` runs independent graphs side by side (one input and one
output each) and every compiled bundle runs on several inputs. A bundle that fails to build is split in
halves until the failing graphs are found, so every failure names its seed.

- compile:  compiled (host) vs eager, <= 1e-4 relative to each output's scale;
- prune:    the pruned model vs the original with the removed channels zeroed (float64, as tests/prune_oracle.py),
            the MACs budget met within its tolerance or the shortfall explained in the report with consistent
            numbers and a GraphoptWarning, and the compiled pruned model vs the pruned eager model (<= 1e-4);
- quantize: the compiled QDQ model bit-identical to the folded integer graph in PyTorch, and the integer graph
            vs its QDQ module within the README's contract (>= 98 % of outputs within 1 LSB end to end).

``python tests/fuzz_check.py compile|prune|quantize SEED...`` checks seeds one at a time and reduces each
failing one to a minimal reproducer (blocks dropped while the same path still fails).
"""
from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass

import torch
from fuzzgen import Case, case
from prune_oracle import zero_consumers
from torch import nn

import graphopt
from graphopt.passes.manager import max_rel_error

RTOL = 1e-4  # compiled vs eager, relative to the output's scale
WITHIN_ONE_LSB = 0.98  # the quantized contract, end to end
CHECK_INPUTS = (1, 2, 3)  # Case.inputs(which=...) every compiled bundle runs; 1 is the example input
PATHS = ("compile", "prune", "quantize")


@dataclass(frozen=True)
class Failure:
    seed: int
    path: str
    what: str
    error: float | None = None  # in the oracle's unit: relative error, output LSB, or fraction of the budget

    def __str__(self) -> str:
        size = "" if self.error is None else f" [{self.error:.3g}]"
        return f"seed {self.seed} {self.path}: {self.what}{size}"


class Bundle(nn.Module):
    """Independent graphs side by side: input i feeds graph i, output i is its result."""

    def __init__(self, graphs: list[nn.Module]):
        super().__init__()
        self.graphs = nn.ModuleList(graphs)
        self.eval()

    def forward(self, *xs):
        return tuple(g(x) for g, x in zip(self.graphs, xs, strict=True))


@dataclass(frozen=True)
class Item:
    """A float graph to compile and compare with its eager self: the case's model or its pruned copy."""

    case: Case
    path: str
    module: nn.Module


def suspects(model: nn.Module) -> list[str]:
    """Features of ``model`` in the areas with open bugs (issue 15), named in failure messages for triage."""
    found = []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.in_features == 1:
            found.append(f"reduction length 1: {path} Linear(1, {m.out_features})")
        elif isinstance(m, nn.Conv2d) and m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] == 1:
            found.append(f"reduction length 1: {path} Conv2d({m.in_channels}, {m.out_channels}, 1, groups={m.groups})")
    if any(getattr(m, "inplace", False) for m in model.modules()):
        found.append("in-place activation")
    if any(getattr(m, "in_place_add", False) for m in model.modules()):
        found.append("out += x")
    if any(type(m).__name__ == "ChannelShuffle" for m in model.modules()):
        found.append("channel shuffle (view-transpose-view)")
    return found


def _suspects_text(model: nn.Module) -> str:
    return "; ".join(suspects(model)) or "no known suspect"


def _error_text(exc: BaseException) -> str:
    """The error's class and its first two lines (a graphopt error's summary and first item)."""
    lines = [line.strip()[:200] for line in str(exc).strip().splitlines()[:2]]
    return f"{type(exc).__name__}: {' / '.join(lines)}"


def _inputs(cases: list[Case], which: int) -> tuple[torch.Tensor, ...]:
    return tuple(c.inputs(1, which) for c in cases)


def _compile(module: nn.Module, cases: list[Case]):
    return graphopt.compile(module, _inputs(cases, CHECK_INPUTS[0]), "host", progress=False)


# -- float graphs: compile and prune ----------------------------------------------------------------------------

def check_float(items: list[Item]) -> list[Failure]:
    """Compile ``items`` as one bundle and compare each output with its eager module on every check input."""
    if not items:
        return []
    cases = [i.case for i in items]
    try:
        cm = _compile(Bundle([i.module for i in items]), cases)
    except Exception as exc:  # noqa: BLE001  any error is a finding; halves say which graph
        if len(items) == 1:
            return [Failure(cases[0].seed, items[0].path, f"compile raised {_error_text(exc)}; "
                                                          f"{_suspects_text(items[0].module)}")]
        half = len(items) // 2
        return check_float(items[:half]) + check_float(items[half:])
    worst = [0.0] * len(items)
    for which in CHECK_INPUTS:
        xs = _inputs(cases, which)
        with torch.no_grad():
            want = [i.module(x) for i, x in zip(items, xs, strict=True)]
        got = cm(*xs)
        worst = [max(e, max_rel_error(g, w)) for e, g, w in zip(worst, got, want, strict=True)]
    return [Failure(i.case.seed, i.path, f"compiled (host) vs eager{' pruned' if i.path == 'prune' else ''}: relative "
                                         f"error > {RTOL:g}; {_suspects_text(i.module)}", e)
            for i, e in zip(items, worst, strict=True) if not e <= RTOL]


def prune_case(c: Case) -> tuple[nn.Module, nn.Module, list[warnings.WarningMessage]]:
    """(original, pruned, GraphoptWarnings given) with the case's budget."""
    model = c.model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = graphopt.prune(model, (c.inputs(),), target_macs=c.target_macs, channel_multiple=c.channel_multiple,
                                criterion=c.criterion)
    return model, pruned.eval(), [w for w in caught if issubclass(w.category, graphopt.GraphoptWarning)]


def budget_failure(c: Case, report: graphopt.PruneReport, warned: list) -> Failure | None:
    """None if the MACs budget is met within tolerance, or if the report says why not with numbers that agree
    with the pruned graph and a GraphoptWarning was given."""
    t, lim = report.target, report.target.get("limit")
    measured = report.macs_after / report.macs_before if report.macs_before else 1.0
    miss = abs(measured - t["fraction"])

    def fail(what):
        return Failure(c.seed, "prune", f"MACs target {t['fraction']}, pruned graph has {measured:.4f}: {what}", miss)

    if abs(t["achieved"] - measured) > 1e-3:
        return fail(f"the report says achieved {t['achieved']}")
    if miss <= t["tolerance"] + 1e-9:
        return None if t["within_tolerance"] else fail("met, but the report says it was not")
    if t["within_tolerance"] or not lim:
        return fail("missed, and the report does not say why")
    if not warned:
        return fail("missed without a GraphoptWarning")
    if not any(str(lim["reachable_min"]) in n and str(t["achieved"]) in n for n in report.notes):
        return fail(f"no report note gives the numbers {lim}")
    if lim["reason"] == "below the reachable minimum" and not (
            t["fraction"] < lim["reachable_min"] and abs(measured - lim["reachable_min"]) <= 1e-3):
        return fail(f"the limit {lim} does not explain it")
    if lim["reason"] == "channel steps too coarse" and not (lim["smallest_step"] or 0) >= 2 * miss - 1e-3:
        return fail(f"a channel step of {lim['smallest_step']} would have got closer")
    return None


def oracle_error(model: nn.Module, pruned: nn.Module, c: Case) -> float:
    """Max error (relative to output scale, float64) of pruned vs original-with-removed-channels-zeroed."""
    reference = zero_consumers(model, pruned.graphopt_pruning.plan).double().eval()
    got_model = copy.deepcopy(pruned).double().eval()
    err = 0.0
    for which in CHECK_INPUTS:
        x = c.inputs(1, which).double()
        with torch.no_grad():
            err = max(err, max_rel_error(got_model(x), reference(x)))
    return err


def prune_checks(c: Case) -> tuple[list[Failure], nn.Module | None]:
    """The pure-PyTorch prune oracles of one case, and its pruned model to compile (None if prune raised or removed
    nothing: then it is the original, which the compile path checks)."""
    try:
        model, pruned, warned = prune_case(c)
    except Exception as exc:  # noqa: BLE001
        return [Failure(c.seed, "prune", f"graphopt.prune raised {_error_text(exc)}")], None
    failures = []
    err = oracle_error(model, pruned, c)
    if not err <= 1e-9:
        failures.append(Failure(c.seed, "prune", "pruned vs original with removed channels zeroed (float64)", err))
    budget = budget_failure(c, pruned.graphopt_pruning, warned)
    return failures + ([budget] if budget else []), pruned if pruned.graphopt_pruning.plan else None


def check_compile_and_prune(cases: list[Case]) -> list[Failure]:
    """Both float paths with one build: the original graphs and the pruned ones in the same bundle."""
    failures, items = [], [Item(c, "compile", c.model()) for c in cases]
    for c in cases:
        found, pruned = prune_checks(c)
        failures += found
        if pruned is not None:
            items.append(Item(c, "prune", pruned))
    return failures + check_float(items)


def check_compile(cases: list[Case]) -> list[Failure]:
    return check_float([Item(c, "compile", c.model()) for c in cases])


def check_prune(cases: list[Case]) -> list[Failure]:
    failures, items = [], []
    for c in cases:
        found, pruned = prune_checks(c)
        failures += found
        items += [Item(c, "prune", pruned)] if pruned is not None else []
    return failures + check_float(items)


# -- quantize ---------------------------------------------------------------------------------------------------

def _output_scales(qm) -> list[float | None]:
    """Scale of each output's final dequantize (None if that output is not dequantized)."""
    out = next(n for n in qm.graph.nodes if n.op == "output").args[0]
    return [float(n.args[1]) if "dequantize" in str(getattr(n, "target", "")) else None
            for n in (out if isinstance(out, (tuple, list)) else (out,))]


def check_quantize(cases: list[Case]) -> list[Failure]:
    """PTQ (default QuantScheme) of a bundle, its folded integer graph, and the compiled QDQ bundle."""
    if not cases:
        return []
    calibration = [tuple(c.inputs(4, 10 + i) for c in cases) for i in range(4)]
    models = [c.model() for c in cases]
    try:
        qm = graphopt.quantize(Bundle(models), _inputs(cases, 1), calibration=calibration)
        ig = graphopt.to_integer(qm, _inputs(cases, 1))
        cm = _compile(qm, cases)
    except Exception as exc:  # noqa: BLE001
        if len(cases) == 1:
            return [Failure(cases[0].seed, "quantize", f"{_error_text(exc)}; {_suspects_text(models[0])}")]
        half = len(cases) // 2
        return check_quantize(cases[:half]) + check_quantize(cases[half:])
    scales = _output_scales(qm)
    exact = [0.0] * len(cases)  # max |compiled - integer graph|, in output LSB
    within, biggest = [1.0] * len(cases), [0.0] * len(cases)  # integer graph vs QDQ
    for which in CHECK_INPUTS:
        xs = _inputs(cases, which)
        with torch.no_grad():
            want, ref = ig(*xs), qm(*xs)
        got = cm(*xs)
        for i, s in enumerate(scales):
            exact[i] = max(exact[i], (got[i].double() - want[i].double()).abs().max().item() / (s or 1.0))
            if s:
                lsb = ((want[i].double() - ref[i].double()).abs() / s).round()
                within[i] = min(within[i], (lsb <= 1).double().mean().item())
                biggest[i] = max(biggest[i], lsb.max().item())
    failures = []
    for i, c in enumerate(cases):
        if exact[i] != 0:
            failures.append(Failure(c.seed, "quantize", f"compiled != folded integer graph (output LSB); "
                                                        f"{_suspects_text(models[i])}", exact[i]))
        if scales[i] is None:
            failures.append(Failure(c.seed, "quantize", "the output is not dequantized from int8; the contract "
                                                        "cannot be checked"))
        elif within[i] < WITHIN_ONE_LSB:
            failures.append(Failure(c.seed, "quantize", f"integer graph vs QDQ: {within[i]:.1%} of outputs within "
                                                        f"1 LSB (contract >= {WITHIN_ONE_LSB:.0%}), max "
                                                        f"{biggest[i]:g} LSB", 1 - within[i]))
    return failures


CHECKS = {"compile": check_compile, "prune": check_prune, "quantize": check_quantize}


def _kind(f: Failure) -> str:
    return f.what.split(":")[0].split(";")[0]


def reduce(c: Case, failure: Failure) -> Case:
    """Drop blocks (last first) while the same kind of ``failure`` persists: a minimal reproducer of a failing seed."""
    for i in reversed(range(len(c.blocks))):
        smaller = c.without(i)
        if smaller.blocks and any(_kind(f) == _kind(failure) for f in CHECKS[failure.path]([smaller])):
            c = smaller
    return c


if __name__ == "__main__":
    torch.set_num_threads(1)
    for seed in map(int, sys.argv[2:]):
        failed = CHECKS[sys.argv[1]]([case(seed)])
        print("\n".join(map(str, failed)) or f"seed {seed} {sys.argv[1]}: ok", flush=True)
        for f in {_kind(f): f for f in failed}.values():
            print(f"minimal reproducer of '{_kind(f)}':", reduce(case(seed), f), flush=True)
