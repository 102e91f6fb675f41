"""The TVM side of `graphopt.tune`: MetaSchedule tasks, builders and the tuning loop.

- `fused_module(ep, spec)`: the lowering phases through ``fuse`` (`run_phases`) — exactly the
  module `lower` schedules, so tuning records match compile's kernels by structural hash.
- `extract(mod, spec)`: MetaSchedule tasks (one per distinct fused PrimFunc).
- `tune_tasks(...)`: first builds and runs graphopt's default schedule of every kernel on the
  tuning runner (`measure_defaults`, recorded in the database: compile keeps the default wherever no
  record beat it, so tuning never makes a kernel slower), then tunes the kernels in order of their
  share of the model's default time (weight × default time), each to its budget, counting trials
  already spent in the database (so an interrupted or killed session resumes where it stopped, and
  a finished one is not run again), logging progress lines.

Compile applies the records with `graphopt.targets.lowering.tuned`. Builder workers build
without importing tensor intrinsics (`_fast_build`: importing every GPU intrinsic costs ~55 s per
worker in apache-tvm 0.27); the parent registers those its target's rules name with
`kernels.prepare_tvm`. Refuses
(`TuningError`): targets MetaSchedule cannot tune (no LLVM kind), a runner that does not fit the
target.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from graphopt.errors import TuningError
from graphopt.targets.lowering.kernels import prepare_tvm
from graphopt.targets.lowering.phases import run_phases
from graphopt.targets.lowering.schedules import dot_schedule, dot_tiles, schedule_module
from graphopt.targets.lowering.tuned import is_scheduled
from graphopt.targets.spec import TargetSpec
from graphopt.targets.tuning.database import beats_default

_LOG = logging.getLogger(__name__)


def _fast_build(mod, target, _params):
    """Builder-worker build: compiles the scheduled TIR without importing tensor intrinsics."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _cross_export(compiler, mod):
    """Builder-worker export: a shared library linked by `compiler` (a device cannot link a .tar)."""
    import os
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-ms-"), "kernel.so")
    mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    return path


def make_builder(spec: TargetSpec, timeout_sec: float = 180):
    """LocalBuilder with the fast build (and the target's cross compiler when it has one)."""
    import functools

    import cloudpickle
    from tvm.s_tir import meta_schedule as ms

    # builder workers unpickle these functions by value: importing graphopt there would import torch
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    f_export = functools.partial(_cross_export, spec.cross_compiler) if spec.cross_compiler else None
    return ms.builder.LocalBuilder(f_build=_fast_build, f_export=f_export, timeout_sec=timeout_sec,
                                   max_workers=spec.num_cores if not spec.cross_compiler else None)


# --------------------------------------------------------------------------- modules and tasks

def fused_module(ep, spec: TargetSpec):
    """The lowering phases through ``fuse`` on `ep`: the module compile schedules."""
    return run_phases(ep, spec, {}, {}, until="fuse")


def check_tunable(spec: TargetSpec) -> None:
    if spec.tvm_target.get("kind") != "llvm":
        raise TuningError(f"target {spec.name!r} compiles with TVM's {spec.tvm_target.get('kind')!r} kind; "
                          "MetaSchedule tunes LLVM targets only")


def extract(mod, spec: TargetSpec) -> list:
    """MetaSchedule tasks of `mod`, without the kernels emitted already scheduled (e.g. the binary
    XNOR-popcount ones). Tensorized int8 dot kernels are tasks too, tuned by `tune_dot_task`."""
    from tvm.s_tir import meta_schedule as ms

    prepare_tvm(spec)
    return [t for t in ms.relax_integration.extract_tasks(mod, spec.tvm()) if not is_scheduled(t.dispatched[0]["main"])]


# --------------------------------------------------------------------------- tuning

@dataclass
class TaskResult:
    name: str
    weight: int
    trials: int  # records in the database for this kernel after the session
    new_trials: int  # measured in this session
    best_seconds: float | None  # best measured run time (icount runner: instructions * 1e-9)
    default_seconds: float | None = None  # graphopt's default schedule on the same runner (fastest measurement)
    planned: int = 0  # trials this session set out to run (0: the budget was already spent)
    spent: int = 0  # trials counted against the budget after the session (records, or more: see tuning_db)

    @property
    def uses_tuned(self) -> bool:
        """Whether compile takes the tuned record (it measured faster than the default schedule)."""
        return beats_default(self.best_seconds, self.default_seconds)


@dataclass
class Budget:
    total: int
    per_task: int


def budget(trials: int, n_tasks: int, per_task: int | None) -> Budget:
    if not isinstance(trials, int) or trials < 1:
        raise TuningError(f"trials must be a positive int, got {trials!r}")
    if per_task is not None and (not isinstance(per_task, int) or per_task < 1):
        raise TuningError(f"trials_per_task must be a positive int or None, got {per_task!r}")
    return Budget(trials, per_task if per_task is not None else max(1, math.ceil(trials / max(1, n_tasks))))


def _count(state: dict, unit: Callable[[float], str], seconds: list[float | None]) -> None:
    """Count measured trials (None: failed) in the session's progress `state` and log a progress line."""
    for secs in seconds:
        state["done"] += 1
        state["task_done"] += 1
        if secs is not None:
            state["best"] = secs if state["best"] is None else min(state["best"], secs)
    elapsed = time.perf_counter() - state["start"]
    eta = elapsed / max(1, state["done"]) * (state["total"] - state["done"])
    best = unit(state["best"]) if state["best"] is not None else "-"
    _LOG.info(f"  [{state['task_index']}/{state['n_tasks']}] {state['task_name']}: "
              f"{state['task_done']}/{state['task_budget']} trials, best {best} | session "
              f"{state['done']}/{state['total']} trials, ETA {eta / 60:.1f} min")


def _progress_callback(state: dict, unit: Callable[[float], str]):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            _count(state, unit, [sum(float(s) for s in r.run_secs) / len(r.run_secs)
                                 if r.error_msg is None and r.run_secs else None for r in runner_results])

    return _Progress()


def _build(mods: list, spec: TargetSpec, builder) -> list[str | None]:
    """Build each single-kernel module: its artifact path, or None if it failed (logged at debug level)."""
    from tvm.s_tir.meta_schedule.builder import BuilderInput

    built = builder.build([BuilderInput(m, spec.tvm()) for m in mods])
    for m, b in zip(mods, built, strict=True):
        if b.error_msg is not None:
            _LOG.debug("%s did not build: %s", m["main"].attrs.get("global_symbol", "kernel"), b.error_msg)
    return [b.artifact_path if b.error_msg is None else None for b in built]


def _run(artifact: str | None, mod, runner) -> float | None:
    """Mean run time in seconds of a built kernel on `runner`, or None if it failed to build or run."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    if artifact is None:
        return None
    result = runner.run([RunnerInput(artifact, "cpu", ArgInfo.from_prim_func(mod["main"]))])[0].result()  # LLVM
    if result.error_msg is not None or not result.run_secs:
        _LOG.debug("%s did not run: %s", mod["main"].attrs.get("global_symbol", "kernel"), result.error_msg)
        return None
    return sum(float(t) for t in result.run_secs) / len(result.run_secs)


def _discard(artifacts: list[str | None]) -> None:
    import shutil
    from pathlib import Path

    for a in artifacts:
        if a is not None:
            shutil.rmtree(Path(a).parent, ignore_errors=True)


def _measure(mods: list, spec: TargetSpec, builder, runner) -> list[float | None]:
    """Build and run each single-kernel module on `runner`: its mean run time in seconds, or None if
    it failed to build or run."""
    artifacts = _build(mods, spec, builder)
    try:
        return [_run(a, m, runner) for a, m in zip(artifacts, mods, strict=True)]
    finally:
        _discard(artifacts)


# Rounds of a paired check: each runs the default schedule and the best record once, alternately.
_PAIRED_ROUNDS = 3


def check_best_records(tasks: list, spec: TargetSpec, database, builder, runner) -> None:
    """Time each kernel's default schedule against its best record alternately, `_PAIRED_ROUNDS`
    rounds on `runner`, and record the faster time of each side (`mark_paired`; compile decides on
    these). The default's own measurement is made once, before the first trial, and the best record
    is the luckiest of many trials: on a loaded machine one slow stretch made stored defaults 10-200x
    too slow (tuned MobileNetV2 1.8x slower end to end). Paired rounds see the same load. Kernels
    checked since their last record are skipped."""
    from tvm import s_tir

    todo = []
    for t in tasks:
        mod = t.dispatched[0]
        best = database.get_top_k(database.commit_workload(mod), 1) if database.records_for(mod) else []
        if best and best[0].run_secs and float(best[0].run_secs[0]) < 1e9 and database.paired_seconds(mod) is None:
            sch = s_tir.Schedule(mod)
            best[0].trace.apply_to_schedule(sch, remove_postproc=False)
            todo.append((mod, schedule_module(mod.clone(), spec)[0], sch.mod))
    if not todo:
        return
    mods = [m for _, default, tuned in todo for m in (default, tuned)]
    artifacts = _build(mods, spec, builder)
    try:
        times: list[list[float]] = [[] for _ in mods]
        for r in range(_PAIRED_ROUNDS):
            for k in range(len(todo)):
                for j in ((0, 1) if r % 2 == 0 else (1, 0)):  # which side runs first alternates
                    secs = _run(artifacts[2 * k + j], mods[2 * k + j], runner)
                    if secs is not None:
                        times[2 * k + j].append(secs)
    finally:
        _discard(artifacts)
    kept = 0
    for k, (mod, _, _) in enumerate(todo):
        default, tuned = times[2 * k], times[2 * k + 1]
        if default and tuned:
            database.mark_paired(mod, min(default), min(tuned))
            kept += not beats_default(min(tuned), min(default))
    _LOG.info(f"checked the best record of {len(todo)} kernels against graphopt's default schedule in "
              f"{_PAIRED_ROUNDS} paired rounds: {kept} keep the default")


def measure_defaults(tasks: list, spec: TargetSpec, database, builder, runner) -> None:
    """Build and run graphopt's default schedule of each task not yet measured on `runner`; record
    the times in `database` (a kernel whose default fails to build or run gets no time: its records
    then apply as before)."""
    todo = [t for t in tasks if database.default_seconds(t.dispatched[0]) is None]
    if not todo:
        return
    secs = _measure([schedule_module(t.dispatched[0].clone(), spec)[0] for t in todo], spec, builder, runner)
    for task, t in zip(todo, secs, strict=True):
        if t is not None:
            database.mark_default(task.dispatched[0], t)
    failed = secs.count(None)
    _LOG.info(f"measured graphopt's default schedule of {len(todo) - failed} kernels on the tuning runner"
              + (f" ({failed} failed to build or run: their tuned records apply unchecked)" if failed else ""))


# A trial that failed to build or run, recorded as MetaSchedule records one (so it counts as spent).
_FAILED_SECONDS = 1e10

# Tiles built and run per batch: a kill loses at most one batch of measurements.
_DOT_BATCH = 8


def tune_dot_task(task, spec: TargetSpec, database, tiles: list, trials: int, builder, runner,
                  on_batch: Callable[[list[float | None]], None]) -> None:
    """Tune a tensorized int8 dot kernel: measure its next `trials` register tiles and loop orders
    (`tiles` from `schedules.dot_tiles`, after the default one, which `measure_defaults` measures,
    in the load model's order) and commit each as a tuning record. Packed weights and the intrinsic
    leave MetaSchedule's own rules nothing to choose and the tiles are few (tens), so they are
    measured in order rather than searched; a resumed session starts after the trials already spent."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    mod = task.dispatched[0]
    start = database.trials_spent(mod)
    todo = tiles[1:][start:start + trials]
    workload = database.commit_workload(mod)
    args = ArgInfo.from_prim_func(mod["main"])
    for b in range(0, len(todo), _DOT_BATCH):
        with spec.tvm():
            batch = [dot_schedule(s_tir.Schedule(mod), spec, tile) for tile in todo[b:b + _DOT_BATCH]]
        seconds = _measure([sch.mod for sch in batch], spec, builder, runner)
        for sch, secs in zip(batch, seconds, strict=True):
            database.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, workload, [_FAILED_SECONDS if secs is None else secs], spec.tvm(), args))
        on_batch(seconds)


def tune_tasks(tasks: list, spec: TargetSpec, database, bud: Budget, runner, *,
               unit: Callable[[float], str], seed: int = 0) -> list[TaskResult]:
    """Tune each task up to ``bud.per_task`` trials within ``bud.total`` trials for the model. Trials
    already spent on these tasks count (`TuningDatabase.trials_spent`: records, and the trials of
    finished sessions the search had no new candidate for), so a finished budget runs nothing."""
    from tvm.s_tir import meta_schedule as ms

    prepare_tvm(spec)
    target = spec.tvm()
    have = [database.records_for(t.dispatched[0]) for t in tasks]
    spent = [database.trials_spent(t.dispatched[0]) for t in tasks]
    tiles = [dot_tiles(t.dispatched[0]["main"], spec) for t in tasks]
    limit = [len(tl) - 1 if tl else bud.total for tl in tiles]  # a dot kernel: its tiles besides the default
    want = [max(0, min(bud.per_task, bud.total, n) - s) for s, n in zip(spent, limit, strict=True)]
    left_total = max(0, bud.total - sum(min(s, bud.per_task) for s in spent))
    # its worker processes take seconds to start: only when there is something to tune or check
    unchecked = any(database.records_for(t.dispatched[0]) and database.paired_seconds(t.dispatched[0]) is None
                    for t in tasks)
    builder = make_builder(spec) if (left_total and any(want)) or unchecked else None
    if builder is not None and left_total and any(want):
        measure_defaults(tasks, spec, database, builder, runner)

    def share(i: int) -> float:  # the kernel's part of the model's default time (weight alone if unmeasured)
        return int(tasks[i].weight) * (database.default_seconds(tasks[i].dispatched[0]) or 1.0)

    # spend what is left of the model budget where the time is: largest share of default time first
    order = sorted(range(len(tasks)), key=lambda i: -share(i))
    plan = {}
    for i in order:
        plan[i] = min(want[i], left_total)
        left_total -= plan[i]
    total = sum(plan.values())
    _LOG.info(f"{len(tasks)} kernels to tune; {sum(have)} records already in {database.folder} ({sum(spent)} "
              f"trials spent); {total} trials to run now (budget {bud.total}, at most {bud.per_task} per kernel)"
              + ("; the budget is already spent, nothing to do (raise trials to tune further)" if not total else ""))
    state = {"done": 0, "total": total, "start": time.perf_counter(), "n_tasks": len(tasks)}
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [_progress_callback(state, unit)]
    for n, i in enumerate(order, 1):
        task = tasks[i]
        mod = task.dispatched[0]
        if plan[i] > 0 and tiles[i]:
            state.update(task_index=n, task_name=task.task_name, task_done=0, task_budget=plan[i], best=None)
            tune_dot_task(task, spec, database, tiles[i], plan[i], builder, runner,
                          lambda seconds: _count(state, unit, seconds))
            database.mark_spent(mod, spent[i] + plan[i])
        elif plan[i] > 0:
            state.update(task_index=n, task_name=task.task_name, task_done=0, task_budget=plan[i], best=None)
            # search effort scaled to the budget: a few trials need no 512-candidate population
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=min(256, max(16, 8 * plan[i])), init_min_unmeasured=min(32, max(4, 2 * plan[i])),
                genetic_num_iters=1 if plan[i] < 16 else 3)
            with target:
                ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                                     search_strategy=strategy, task_name=task.task_name,
                                     num_threads=spec.num_cores if not spec.cross_compiler else "physical",
                                     rand_state=seed + i, logger=None)
            ms.task_scheduler.TaskScheduler.create("round-robin").tune(
                tasks=[ctx], task_weights=[1.0], max_trials_global=plan[i], max_trials_per_task=plan[i],
                num_trials_per_iter=min(plan[i], 32), builder=builder, runner=runner,
                measure_callbacks=callbacks, database=database, cost_model=ms.CostModel.create("xgb"))
            database.mark_spent(mod, spent[i] + plan[i])  # finished: an exhausted search still spent its plan
    if builder is not None:
        check_best_records(tasks, spec, database, builder, runner)
    results = []
    for i in order:
        mod = tasks[i].dispatched[0]
        default, best = database.paired_seconds(mod) or (database.default_seconds(mod), database.best_seconds(mod))
        results.append(TaskResult(tasks[i].task_name, int(tasks[i].weight), database.records_for(mod),
                                  database.records_for(mod) - have[i], best, default, plan[i],
                                  database.trials_spent(mod)))
    return results
