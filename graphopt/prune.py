"""Structured pruning: remove whole filters/channels by L1/L2 filter norm, to a budget.

    small = graphopt.prune(model, (x,), target_macs=0.5, criterion="l1")   # or ratio=, target_params=
    small.graphopt_pruning.to_dict()                                        # what was removed, and why not more

The dependency groups come from the captured fx graph (`graphopt.passes.dependency`); the result
is a deep copy of the user's model whose ``nn.Conv*``/``nn.Linear``/``nn.BatchNorm*`` modules are
shrunk in place (same classes, same ``state_dict`` keys, smaller tensors), so it trains, exports
and loads its own ``state_dict``. To rebuild the pruned structure from a fresh model, call
``apply_plan(fresh_model, report.plan)`` and then ``load_state_dict``.

Importance of a channel = sum over the group's producer filters of their L1 or L2 norm, divided
by the group's mean (so groups are comparable) for global ranking. ``target_macs``/``target_params``
are fractions of the original to keep: the least important channel steps go first, then single steps
(or one group's step traded for another's) move the exact, coupled cost into ``tolerance``. Where the
groups cannot get there, ``report.target["limit"]`` says why with the numbers (reachable minimum,
unprunable share, share held by minimum channels, declined groups, smallest step), a report note
says it in words and a `GraphoptWarning` is given. ``ratio`` removes that fraction of channels from
every prunable group.
Kept channel counts are rounded to ``channel_multiple`` (the target's SIMD preference in compile).

Refused: budgets outside (0, 1), unknown criteria, several budgets at once (`ConfigError`). Groups
the analysis cannot prove safe are kept and listed with the reason; if the pruned model does not
match the original-with-removed-channels-zeroed on the example inputs (e.g. the model's code
hard-codes a channel count in ``view(-1, 512)``), the offending groups are kept too — the result
is never a wrong model. A model with nothing prunable comes back unchanged with a warning.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import fnmatch
import heapq
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from graphopt.analysis import analyze
from graphopt.api import GraphoptWarning
from graphopt.capture import capture, check_example_inputs, check_model
from graphopt.config import as_enum
from graphopt.errors import ConfigError
from graphopt.passes.base import Decline
from graphopt.passes.dependency import (
    DependencyGraph,
    Group,
    Role,
    analyze_dependencies,
)
from graphopt.pipeline import max_rel_error

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Criterion(str, enum.Enum):
    L1 = "l1"  # sum of absolute weights of a filter
    L2 = "l2"  # Euclidean norm of a filter


def _fraction(name: str, value, upper_inclusive: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value and (
        value <= 1 if upper_inclusive else value < 1)
    if not ok:
        raise ConfigError(f"{name}={value!r} must be a number in (0, 1{']' if upper_inclusive else ')'}, "
                          f"e.g. {name}=0.5")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune. Give one structured budget and/or an unstructured ``sparsity``.

    target_macs / target_params: fraction of the original MACs / parameters to keep (0 < x < 1).
    ratio:            fraction of channels to remove from every prunable group.
    criterion:        `Criterion` (or "l1"/"l2"): the filter norm ranking channels.
    channel_multiple: round kept channels to this multiple (None: the compile target's, else 1).
    exclude:          fnmatch patterns of module paths that keep their exact shape.
    protect_first:    keep the output channels of the first conv/linear.
    max_group_ratio:  never remove more than this fraction of one group.
    tolerance:        allowed |achieved − target| as a fraction of the original (default ±2 %).
    sparsity:         unstructured magnitude sparsity applied after (compile bakes the zeros in).
    sparse_storage:   with ``sparsity``, compile also writes ``weights.sparse.npz`` (bitmask + values).
    """

    target_macs: float | None = None
    target_params: float | None = None
    ratio: float | None = None
    criterion: Criterion = Criterion.L1
    channel_multiple: int | None = None
    exclude: tuple[str, ...] = ()
    protect_first: bool = False
    max_group_ratio: float = 0.9
    tolerance: float = 0.02
    sparsity: float | None = None
    sparse_storage: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "criterion", as_enum(Criterion, self.criterion, "criterion"))
        budgets = [n for n in ("target_macs", "target_params", "ratio") if getattr(self, n) is not None]
        if len(budgets) > 1:
            raise ConfigError(f"give one structured budget, not {budgets}")
        if not budgets and self.sparsity is None:
            raise ConfigError("nothing to prune: give target_macs=, target_params=, ratio= or sparsity=")
        for n in ("target_macs", "target_params", "ratio", "sparsity"):
            _fraction(n, getattr(self, n))
        _fraction("max_group_ratio", self.max_group_ratio, upper_inclusive=True)
        _fraction("tolerance", self.tolerance)
        if self.channel_multiple is not None and (not isinstance(self.channel_multiple, int)
                                                  or self.channel_multiple < 1):
            raise ConfigError(f"channel_multiple={self.channel_multiple!r} must be an int >= 1")
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ConfigError("exclude must be a tuple of module-path patterns, e.g. ('head', 'layers.0.*')")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.sparse_storage and self.sparsity is None:
            raise ConfigError("sparse_storage=True needs sparsity= (the fraction of weights to zero)")

    @property
    def structured(self) -> bool:
        return any(getattr(self, n) is not None for n in ("target_macs", "target_params", "ratio"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["criterion"] = self.criterion.value
        d["exclude"] = list(self.exclude)
        return d


@dataclass
class PruneReport:
    """What structured pruning did: totals, per group and per layer, declines, and the plan."""

    config: dict
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    target: dict  # {"metric", "fraction", "tolerance", "achieved", "within_tolerance"[, "limit"]} or {"ratio": r}
    groups: list[dict]
    layers: dict[str, dict]
    declined: list[Decline]
    plan: dict[str, dict[str, list[int]]]  # module path -> {"out"/"in": kept indices}
    notes: list[str] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # iterative pruning history
    sparsity: dict = field(default_factory=dict)  # graphopt.magnitude_prune's result, if any

    def to_dict(self) -> dict:
        return {"config": self.config, "macs": {"before": self.macs_before, "after": self.macs_after},
                "params": {"before": self.params_before, "after": self.params_after}, "target": self.target,
                "groups": self.groups, "layers": self.layers, "declined": [d.to_dict() for d in self.declined],
                "notes": list(self.notes), "steps": list(self.steps),
                "sparsity": self.sparsity}


# -- public API ---------------------------------------------------------------------------------------------------

def prune(model: nn.Module, example_inputs, config: PruneConfig | None = None, *, target=None,
          **options) -> nn.Module:
    """A pruned deep copy of ``model``; its report is ``result.graphopt_pruning`` (a `PruneReport`).

    Pass a `PruneConfig` or its fields as keywords (``target_macs=0.5, criterion="l2"``).
    ``target`` (a name or `TargetSpec`) supplies ``channel_multiple`` when the config does not.
    Structured budgets shrink modules; ``sparsity`` then adds magnitude masks (see `graphopt.sparsity`).
    """
    config = _config(config, options)
    check_model(model)
    args = check_example_inputs(example_inputs)
    multiple = config.channel_multiple or (_target_multiple(target) if target is not None else 1)
    pruned, report = _prune(model, args, config, multiple)
    if config.sparsity is not None:
        from graphopt.sparsity import magnitude_prune

        report.sparsity = magnitude_prune(pruned, config.sparsity)
    pruned.graphopt_pruning = report
    return pruned


def prune_for_compile(model: nn.Module, args: tuple, config: PruneConfig, spec) -> tuple[nn.Module, dict]:
    """``compile(prune=config)``: a pruned copy (channels rounded to ``spec.channel_multiple`` unless the config
    sets one; magnitude zeros baked in, no masks) and the report as a dict."""
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"prune= takes a graphopt.PruneConfig, got {type(config).__name__}")
    pruned, report = _prune(model, args, config, config.channel_multiple or spec.channel_multiple)
    if config.sparsity is not None:
        from graphopt.sparsity import magnitude_prune, remove_masks

        report.sparsity = magnitude_prune(pruned, config.sparsity)
        remove_masks(pruned)
    return pruned, report.to_dict()


def prunable_groups(model: nn.Module, example_inputs) -> DependencyGraph:
    """The channel dependency groups of ``model`` (for `graphopt.filter_norm_penalty` or inspection)."""
    check_model(model)
    args = check_example_inputs(example_inputs)
    with _eval(model):
        return analyze_dependencies(capture(model, args).graph_module, model, args)


def prune_iteratively(model: nn.Module, example_inputs, config: PruneConfig, *, steps: int = 5,
                      fine_tune: Callable[[nn.Module, int], float | None] | None = None,
                      min_metric: float | None = None, target=None) -> nn.Module:
    """Prune towards ``config``'s budget in ``steps`` geometric steps, calling ``fine_tune(model, step)``
    after each. If it returns a metric below ``min_metric``, stop and return the model of the step
    before (already fine-tuned). Stops early when a step can remove nothing more.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be an int >= 1")
    config = _config(config, {})
    check_model(model)
    if not config.structured:
        raise ConfigError("prune_iteratively needs a structured budget (target_macs, target_params or ratio); "
                          "for sparsity call graphopt.magnitude_prune with increasing sparsity instead")
    args = check_example_inputs(example_inputs)
    multiple = config.channel_multiple or (_target_multiple(target) if target is not None else 1)
    with _eval(model):
        start = analyze(capture(model, args).graph_module, args)
    history, current = [], model
    for step in range(1, steps + 1):
        step_config = _step_config(config, step, steps, current, args, start)
        if step_config is None:
            break
        candidate, report = _prune(current, args, step_config, multiple)
        metric = fine_tune(candidate, step) if fine_tune is not None else None
        history.append({"step": step, "macs": report.macs_after, "params": report.params_after, "metric": metric})
        if min_metric is not None and metric is not None and metric < min_metric:
            history[-1]["stopped"] = f"metric {metric:g} fell below the floor {min_metric:g}; step discarded"
            break
        if report.macs_after == report.macs_before and report.params_after == report.params_before:
            break
        current, last = candidate, report
    if current is model:
        current = copy.deepcopy(model)
        last = _unchanged_report(model, args, config, note="no pruning step was kept")
    last.steps = history
    last.macs_before, last.params_before = start.macs, start.params
    current.graphopt_pruning = last
    return current


def apply_plan(model: nn.Module, plan: dict[str, dict[str, list[int]]]) -> nn.Module:
    """Shrink ``model``'s modules in place to the kept indices of ``plan`` (a `PruneReport.plan`)."""
    check_model(model)
    if not isinstance(plan, dict):
        raise ConfigError(f"plan must be a PruneReport.plan dict {{module path: kept indices}}, got {type(plan).__name__}")
    for path, keep in plan.items():
        try:
            mod = model.get_submodule(path)
        except AttributeError as exc:
            raise ConfigError(f"plan names module {path!r}, which this model does not have; apply a plan only "
                              "to the architecture it was made for") from exc
        _shrink(mod, path, keep.get("out"), keep.get("in"))
    return model


# -- internals --------------------------------------------------------------------------------------------------

def _config(config: PruneConfig | None, options: dict) -> PruneConfig:
    if config is not None and options:
        raise ConfigError(f"pass either a PruneConfig or keyword options, not both (got {sorted(options)})")
    if config is not None:
        if not isinstance(config, PruneConfig):
            raise ConfigError(f"config must be a graphopt.PruneConfig, got {type(config).__name__}")
        return config
    known = {f.name for f in dataclasses.fields(PruneConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown pruning option(s) {unknown}; known: {sorted(known)}")
    return PruneConfig(**options)


def _target_multiple(target) -> int:
    from graphopt.targets import get_target

    return get_target(target).channel_multiple


class _eval:
    """Run a block with ``model`` in eval mode; restore every submodule's mode afterwards."""

    def __init__(self, model: nn.Module):
        self.modes = {m: m.training for m in model.modules()}
        self.model = model

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        for m, training in self.modes.items():
            m.training = training


def _step_config(config: PruneConfig, step: int, steps: int, current: nn.Module, args, start) -> PruneConfig | None:
    if config.ratio is not None:
        return dataclasses.replace(config, ratio=1 - (1 - config.ratio) ** (1 / steps))
    metric = "target_macs" if config.target_macs is not None else "target_params"
    goal = getattr(config, metric) ** (step / steps) * (start.macs if metric == "target_macs" else start.params)
    with _eval(current):
        now = analyze(capture(current, args).graph_module, args)
    relative = goal / (now.macs if metric == "target_macs" else now.params)
    return dataclasses.replace(config, **{metric: relative}) if relative < 1 - 1e-9 else None


def _importance(model: nn.Module, deps: DependencyGraph, criterion: Criterion) -> dict[int, list[float]]:
    norms = {}
    for path, info in deps.modules.items():
        if info.kind != "bn":
            w = model.get_submodule(path).weight.detach().flatten(1).double()
            norms[path] = w.abs().sum(1) if criterion is Criterion.L1 else w.pow(2).sum(1).sqrt()
    out = {}
    for g in deps.prunable_groups:
        raw = [sum(float(norms[m.module][m.index]) for m in cls if m.role is Role.OUT) for cls in g.classes]
        mean = sum(raw) / len(raw) or 1.0
        out[g.id] = [r / mean for r in raw]
    return out


class _Costs:
    """Analytic MACs/params of the shrinkable modules as classes are removed (the rest is a constant)."""

    def __init__(self, deps: DependencyGraph, macs: int, params: int):
        self.info = deps.modules
        self.kept = {p: [i.out_channels, i.in_channels] for p, i in self.info.items()}
        base = [self.info[p].cost(*k) for p, k in self.kept.items()]
        self.const = (macs - sum(b[0] for b in base), params - sum(b[1] for b in base))
        self.total = [macs, params]

    def module(self, path: str) -> tuple[int, int]:
        return self.info[path].cost(*self.kept[path])

    def remove(self, classes, sign: int = 1) -> None:
        touched = {m.module for cls in classes for m in cls}
        before = {p: self.module(p) for p in touched}
        for cls in classes:
            for m in cls:
                self.kept[m.module][m.role is Role.IN] -= sign
        for p in touched:
            after = self.module(p)
            self.total[0] += after[0] - before[p][0]
            self.total[1] += after[1] - before[p][1]


def _levels(n: int, multiple: int, max_ratio: float) -> list[int]:
    """Allowed kept counts of a group of ``n`` classes, descending from ``n``."""
    floor = max(1, math.ceil(n * (1 - max_ratio) - 1e-9))
    return [n] + [k for k in range((n - 1) // multiple * multiple, 0, -multiple) if k >= floor]


class _Search:
    """Kept level per group, moved one channel step at a time over the exact (coupled) cost model."""

    def __init__(self, groups: dict[int, Group], imp: dict[int, list[float]], levels: dict[int, list[int]],
                 costs: _Costs, metric: int):
        self.groups, self.imp, self.levels, self.costs, self.metric = groups, imp, levels, costs, metric
        self.order = {gid: sorted(range(len(v)), key=v.__getitem__) for gid, v in imp.items()}
        self.at = dict.fromkeys(groups, 0)

    @property
    def cost(self) -> int:
        return self.costs.total[self.metric]

    def _picks(self, gid: int, i: int) -> list[int]:
        """Class positions removed between level ``i`` and ``i + 1`` of group ``gid``."""
        n = self.groups[gid].channels
        return self.order[gid][n - self.levels[gid][i]:n - self.levels[gid][i + 1]]

    def score(self, gid: int, delta: int) -> float:
        """Mean importance of the channels the next step (delta=+1: remove, -1: restore) moves."""
        picks = self._picks(gid, self.at[gid] if delta > 0 else self.at[gid] - 1)
        return sum(self.imp[gid][p] for p in picks) / len(picks)

    def can(self, gid: int, delta: int) -> bool:
        return self.at[gid] + 1 < len(self.levels[gid]) if delta > 0 else self.at[gid] > 0

    def move(self, gid: int, delta: int) -> None:
        picks = self._picks(gid, self.at[gid] if delta > 0 else self.at[gid] - 1)
        self.costs.remove([self.groups[gid].classes[p] for p in picks], sign=delta)
        self.at[gid] += delta

    def cost_of(self, moves: list[tuple[int, int]]) -> int:
        """The cost after ``moves`` (group, delta); the state is left unchanged."""
        for gid, delta in moves:
            self.move(gid, delta)
        cost = self.cost
        for gid, delta in reversed(moves):
            self.move(gid, -delta)
        return cost

    def greedy(self, goal: float) -> None:
        """Remove the least important steps, globally ranked, until the cost is at or below ``goal``."""
        heap = [(self.score(gid, 1), gid) for gid in self.groups if self.can(gid, 1)]
        heapq.heapify(heap)
        while self.cost > goal and heap:
            _, gid = heapq.heappop(heap)
            self.move(gid, 1)
            if self.can(gid, 1):
                heapq.heappush(heap, (self.score(gid, 1), gid))

    def refine(self, goal: float, tol: float) -> None:
        """Move towards ``goal`` until within ``tol``: single steps (landing inside the tolerance first, then the
        least important removal / most important restore), else one group's step traded for another's. Every move
        gets strictly closer, so this ends."""
        while abs(self.cost - goal) > tol:
            now, delta = abs(self.cost - goal), 1 if self.cost > goal else -1
            best = None
            for gid in self.groups:
                if self.can(gid, delta):
                    miss = abs(self.cost_of([(gid, delta)]) - goal)
                    key = (miss > tol, delta * self.score(gid, delta))
                    if miss < now and (best is None or key < best[0]):
                        best = (key, [(gid, delta)])
            if best is None:
                for a in self.groups:
                    for b in self.groups:
                        if a != b and self.can(a, delta) and self.can(b, -delta):
                            miss = abs(self.cost_of([(a, delta), (b, -delta)]) - goal)
                            if miss < now and (best is None or miss < best[0]):
                                best = (miss, [(a, delta), (b, -delta)])
            if best is None:
                return
            for gid, d in best[1]:
                self.move(gid, d)

    def limits(self, goal: float) -> dict:
        """Costs at every group's minimum and with every prunable channel gone, and the smallest step towards
        ``goal`` from the current state (None if no group can move that way)."""
        start = dict(self.at)
        for gid in self.groups:
            while self.can(gid, 1):
                self.move(gid, 1)
        lowest = self.cost
        rest = [self.groups[gid].classes[p] for gid in self.groups
                for p in self.order[gid][self.groups[gid].channels - self.levels[gid][-1]:]]
        self.costs.remove(rest)
        unprunable = self.cost
        self.costs.remove(rest, sign=-1)
        for gid, i in start.items():
            while self.at[gid] > i:
                self.move(gid, -1)
        delta = 1 if self.cost > goal else -1
        steps = [abs(self.cost_of([(gid, delta)]) - self.cost) for gid in self.groups if self.can(gid, delta)]
        return {"lowest": lowest, "unprunable": unprunable, "step": min(steps) if steps else None}


def _select(deps: DependencyGraph, imp: dict[int, list[float]], config: PruneConfig, multiple: int,
            costs: _Costs) -> tuple[dict[int, int], dict]:
    """Number of classes to remove per group id (lowest importance first), and the target record.

    A MACs/params budget is met within ``config.tolerance`` wherever the groups' channel steps allow; if not,
    the record's ``limit`` says why, with the numbers (fractions of the original)."""
    groups = {g.id: g for g in deps.prunable_groups}
    levels = {gid: _levels(g.channels, multiple, config.max_group_ratio) for gid, g in groups.items()}
    if config.ratio is not None:
        order = {gid: sorted(range(len(v)), key=v.__getitem__) for gid, v in imp.items()}
        removed = {}
        for gid, g in groups.items():
            want = g.channels - round(config.ratio * g.channels)
            removed[gid] = g.channels - min(levels[gid], key=lambda k: (abs(k - want), -k))
            costs.remove([g.classes[p] for p in order[gid][:removed[gid]]])
        return removed, {"ratio": config.ratio}
    metric = 0 if config.target_macs is not None else 1
    fraction = config.target_macs if metric == 0 else config.target_params
    name = "macs" if metric == 0 else "params"
    original = costs.total[metric]
    record = {"metric": name, "fraction": fraction, "tolerance": config.tolerance}
    if original == 0:
        return {}, record | {"achieved": 1.0, "within_tolerance": False,
                             "limit": {"reason": f"the model has no {name} to remove", "reachable_min": 1.0,
                                       "unprunable_share": 1.0, "minimum_channels_share": 0.0,
                                       "declined_groups": len(deps.groups) - len(groups), "smallest_step": None}}
    goal, tol = fraction * original, (config.tolerance + 1e-9) * original  # a hair for float rounding at the edge
    search = _Search(groups, imp, levels, costs, metric)
    search.greedy(goal)
    search.refine(goal, tol)
    removed = {gid: groups[gid].channels - levels[gid][i] for gid, i in search.at.items()}
    achieved = costs.total[metric] / original
    record |= {"achieved": round(achieved, 4), "within_tolerance": abs(achieved - fraction) <= config.tolerance + 1e-9}
    if not record["within_tolerance"]:
        lim = search.limits(goal)
        lowest, unprunable = lim["lowest"] / original, lim["unprunable"] / original
        reason = ("nothing is prunable" if not groups
                  else "below the reachable minimum" if fraction < lowest - config.tolerance
                  else "channel steps too coarse")
        record["limit"] = {"reason": reason, "reachable_min": round(lowest, 4),
                           "unprunable_share": round(unprunable, 4),
                           "minimum_channels_share": round(lowest - unprunable, 4),
                           "declined_groups": len(deps.groups) - len(groups),
                           "smallest_step": None if lim["step"] is None else round(lim["step"] / original, 4)}
    return removed, record


def _shortfall(target: dict, config: PruneConfig, multiple: int) -> str:
    """The report line for a budget that was not met: why, with the numbers."""
    lim = target["limit"]
    head = (f"the {target['metric']} target {target['fraction']} was not met within ±{config.tolerance}: achieved "
            f"{target['achieved']}; ")
    if lim["reason"] == "channel steps too coarse":
        return head + (f"no channel step gets closer (the smallest step that way changes {target['metric']} by "
                       f"{lim['smallest_step']} of the original; channel_multiple={multiple}, max_group_ratio="
                       f"{config.max_group_ratio}); the reachable minimum is {lim['reachable_min']}")
    if lim["reason"] != "below the reachable minimum":
        return head + (f"{lim['reason']}, the reachable minimum is {lim['reachable_min']} ({lim['declined_groups']} "
                       "group(s) declined, reasons per group below)")
    return head + (f"{lim['reason']}: the reachable minimum is {lim['reachable_min']} of the original — "
                   f"{lim['unprunable_share']} is in layers no prunable group shrinks ({lim['declined_groups']} "
                   f"group(s) declined, reasons per group below) and {lim['minimum_channels_share']} is held by "
                   f"minimum channels (max_group_ratio={config.max_group_ratio}, channel_multiple={multiple})")


def _plan(deps: DependencyGraph, imp: dict[int, list[float]], removed: dict[int, int]) -> dict:
    gone: dict[str, dict[str, set[int]]] = {}
    for g in deps.prunable_groups:
        for p in sorted(range(g.channels), key=imp[g.id].__getitem__)[:removed.get(g.id, 0)]:
            for m in g.classes[p]:
                role = "in" if m.role is Role.IN else "out"
                gone.setdefault(m.module, {}).setdefault(role, set()).add(m.index)
    plan = {}
    for path, roles in sorted(gone.items()):
        info = deps.modules[path]
        size = {"out": info.out_channels, "in": info.in_channels}
        plan[path] = {r: [i for i in range(size[r]) if i not in idx] for r, idx in roles.items()}
    return plan


@torch.no_grad()
def _shrink(mod: nn.Module, path: str, out: list[int] | None, inp: list[int] | None) -> None:
    def param(p, *index):
        t = p
        for axis, idx in enumerate(index):
            if idx is not None:
                t = t.index_select(axis, torch.as_tensor(idx, dtype=torch.long, device=t.device))
        return nn.Parameter(t.clone(), requires_grad=p.requires_grad)

    def bad(what):
        return ConfigError(f"plan does not fit module {path} ({type(mod).__name__}): {what}; apply a plan only to "
                           "the architecture it was made for")

    if isinstance(mod, _BNS):
        if inp is not None or out is None or max(out, default=-1) >= mod.num_features:
            raise bad("BatchNorm takes only 'out' indices within num_features")
        idx = torch.as_tensor(out, dtype=torch.long)
        for name in ("weight", "bias"):
            if getattr(mod, name) is not None:
                setattr(mod, name, param(getattr(mod, name), out))
        for name in ("running_mean", "running_var"):
            if getattr(mod, name) is not None:
                setattr(mod, name, getattr(mod, name)[idx].clone())
        mod.num_features = len(out)
    elif isinstance(mod, _CONVS):
        cin, g = mod.in_channels, mod.groups
        inp_all = list(range(cin)) if inp is None else inp
        if max(inp_all, default=-1) >= cin or (out is not None and max(out, default=-1) >= mod.out_channels):
            raise bad("index out of range")
        n_out = mod.out_channels if out is None else len(out)
        if g == 1:
            cols, groups = inp, 1
        elif cin == g:  # depthwise: one group per kept input channel
            cols, groups = None, len(inp_all)
        else:
            cols = sorted({i % (cin // g) for i in inp_all})
            groups = g
            if len(inp_all) != g * len(cols):
                raise bad("grouped convolution must keep the same input positions in every group")
        if n_out % groups:
            raise bad(f"{n_out} output channels do not divide into {groups} groups")
        mod.weight = param(mod.weight, out, cols)
        if mod.bias is not None and out is not None:
            mod.bias = param(mod.bias, out)
        mod.in_channels, mod.out_channels, mod.groups = len(inp_all), n_out, groups
    elif isinstance(mod, nn.Linear):
        if (inp is not None and max(inp, default=-1) >= mod.in_features) or (
                out is not None and max(out, default=-1) >= mod.out_features):
            raise bad("index out of range")
        mod.weight = param(mod.weight, out, inp)
        if mod.bias is not None and out is not None:
            mod.bias = param(mod.bias, out)
        mod.in_features, mod.out_features = mod.weight.shape[1], mod.weight.shape[0]
    else:
        raise bad("only nn.Conv1d/2d/3d, nn.Linear and nn.BatchNorm1d/2d/3d can be shrunk")


@torch.no_grad()
def _zero_removed_inputs(model: nn.Module, plan: dict) -> nn.Module:
    """``model`` with the removed input columns of every consumer zeroed (the reference the result must match)."""
    for path, keep in plan.items():
        mod = model.get_submodule(path)
        if "in" not in keep or isinstance(mod, _BNS):
            continue
        cin, kept = mod.in_channels if isinstance(mod, _CONVS) else mod.in_features, set(keep["in"])
        gone = [i for i in range(cin) if i not in kept]
        if isinstance(mod, _CONVS) and mod.groups > 1:
            if cin == mod.groups:
                per = mod.out_channels // cin
                mod.weight[[o for i in gone for o in range(i * per, (i + 1) * per)]] = 0
            else:
                mod.weight[:, sorted({i % (cin // mod.groups) for i in gone})] = 0
        else:
            mod.weight[:, gone] = 0
    return model


def _matches(model: nn.Module, pruned: nn.Module, plan: dict, args: tuple) -> bool:
    reference = _zero_removed_inputs(copy.deepcopy(model), plan)
    with _eval(reference), _eval(pruned), torch.no_grad():
        want = reference(*args)
        try:
            got = pruned(*args)
        except Exception:
            return False
    try:
        return max_rel_error(got, want) <= 1e-4
    except (RuntimeError, ValueError):  # output shapes or counts differ
        return False


def _group_row(g: Group, removed: int, costs_before: dict, costs_after: dict) -> dict:
    """One report row; a group's MACs/params are those of its producer layers."""
    row = {"id": g.id, "producers": list(g.producers), "channels_before": g.channels,
           "channels_after": g.channels - removed, "prunable": g.prunable, "reasons": list(g.reasons)}
    for when, costs in (("before", costs_before), ("after", costs_after)):
        row[f"macs_{when}"] = sum(costs[p][0] for p in g.producers)
        row[f"params_{when}"] = sum(costs[p][1] for p in g.producers)
    return row


def _prune(model: nn.Module, args: tuple, config: PruneConfig, multiple: int) -> tuple[nn.Module, PruneReport]:
    with _eval(model):
        gm = capture(model, args).graph_module
        before = analyze(gm, args)
        deps = analyze_dependencies(gm, model, args)
    if not config.structured:
        return copy.deepcopy(model), _unchanged_report(model, args, config, before)
    _protect(deps, config)
    imp = _importance(model, deps, config.criterion)
    notes: list[str] = []
    while True:
        costs = _Costs(deps, before.macs, before.params)
        cost_before = {p: costs.module(p) for p in deps.modules}
        removed, target = _select(deps, imp, config, multiple, costs)
        plan = _plan(deps, imp, removed)
        pruned = apply_plan(copy.deepcopy(model), plan)
        if _matches(model, pruned, plan, args):
            break
        failing = [g for g in deps.prunable_groups if removed.get(g.id)
                   and not _prunes_correctly(model, deps, imp, {g.id: removed[g.id]}, args)]
        reason = ("the pruned model did not match the original with these channels zeroed (the model's code "
                  "probably fixes this channel count, e.g. view(-1, 512) or a hard-coded split); kept")
        for g in failing or [g for g in deps.prunable_groups if removed.get(g.id)]:
            g.reasons.append(reason)
            notes.append(f"group {g.id} ({', '.join(g.producers)}): {reason}")
    with _eval(pruned):
        after = analyze(capture(pruned, args).graph_module, args)
    said = len(notes)
    if not deps.prunable_groups:
        notes.append(f"nothing could be pruned in {type(model).__name__}: every channel group is unprunable "
                     "(reasons per group below)")
    if target.get("within_tolerance") is False:
        notes.append(_shortfall(target, config, multiple))
    if len(notes) > said:
        warnings.warn("graphopt.prune: " + "; ".join(notes[said:]) + " (see result.graphopt_pruning)",
                      GraphoptWarning, stacklevel=3)
    cost_after = {p: costs.module(p) for p in deps.modules}
    layers = {p: {"out_before": i.out_channels, "out_after": costs.kept[p][0], "in_before": i.in_channels,
                  "in_after": costs.kept[p][1], "macs_before": cost_before[p][0], "macs_after": cost_after[p][0],
                  "params_before": cost_before[p][1], "params_after": cost_after[p][1]}
              for p, i in deps.modules.items()}
    groups = [_group_row(g, removed.get(g.id, 0), cost_before, cost_after) for g in deps.groups]
    report = PruneReport(config.to_dict() | {"channel_multiple": multiple}, before.macs, after.macs, before.params,
                         after.params, target, groups, layers, deps.declines, plan, notes)
    return pruned, report


def _prunes_correctly(model: nn.Module, deps: DependencyGraph, imp: dict, removed: dict[int, int], args) -> bool:
    plan = _plan(deps, imp, removed)
    return _matches(model, apply_plan(copy.deepcopy(model), plan), plan, args)


def _protect(deps: DependencyGraph, config: PruneConfig) -> None:
    for g in deps.groups:
        modules = {m.module for cls in g.classes for m in cls}
        hit = sorted(p for p in modules if any(fnmatch.fnmatchcase(p, pat) for pat in config.exclude))
        if hit:
            g.reasons.append(f"excluded by the user ({', '.join(hit)})")
        if config.protect_first and deps.first_producer in g.producers:
            g.reasons.append(f"protect_first keeps the output channels of the first layer {deps.first_producer}")


def _unchanged_report(model: nn.Module, args: tuple, config: PruneConfig, cost=None,
                      note: str = "no structured budget given: channels unchanged") -> PruneReport:
    if cost is None:
        with _eval(model):
            cost = analyze(capture(model, args).graph_module, args)
    return PruneReport(config.to_dict(), cost.macs, cost.macs, cost.params, cost.params, {}, [], {}, [], {}, [note])
