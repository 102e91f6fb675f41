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
from graphopt.targets.lowering.dot import DOT_ATTR
from graphopt.targets.lowering.kernels import prepare_tvm
from graphopt.targets.lowering.phases import run_phases
from graphopt.targets.lowering.schedules import schedule_module
from graphopt.targets.lowering.tuned import is_scheduled
from graphopt.targets.spec import TargetSpec

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
    """MetaSchedule tasks of `mod`, without the kernels graphopt schedules itself: tensorized int8
    dot kernels (their packed-weight register tiles around the intrinsic are `schedules.TensorizedDot`'s)
    and kernels emitted already scheduled (e.g. the binary XNOR-popcount ones)."""
    from tvm.s_tir import meta_schedule as ms

    prepare_tvm(spec)
    return [t for t in ms.relax_integration.extract_tasks(mod, spec.tvm())
            if not is_scheduled(t.dispatched[0]["main"]) and DOT_ATTR not in t.dispatched[0].script()]


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
        return self.best_seconds is not None and (self.default_seconds is None or
                                                  self.best_seconds < self.default_seconds)


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


def _progress_callback(state: dict, unit: Callable[[float], str]):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for r in runner_results:
                state["done"] += 1
                state["task_done"] += 1
                if r.error_msg is None and r.run_secs:
                    secs = sum(float(s) for s in r.run_secs) / len(r.run_secs)
                    state["best"] = secs if state["best"] is None else min(state["best"], secs)
            elapsed = time.perf_counter() - state["start"]
            left = state["total"] - state["done"]
            eta = elapsed / max(1, state["done"]) * left
            best = unit(state["best"]) if state["best"] is not None else "-"
            _LOG.info(f"  [{state['task_index']}/{state['n_tasks']}] {state['task_name']}: "
                      f"{state['task_done']}/{state['task_budget']} trials, best {best} | session "
                      f"{state['done']}/{state['total']} trials, ETA {eta / 60:.1f} min")

    return _Progress()


def measure_defaults(tasks: list, spec: TargetSpec, database, builder, runner) -> None:
    """Build and run graphopt's default schedule of each task not yet measured on `runner`; record
    the times in `database` (a kernel whose default fails to build or run gets no time: its records
    then apply as before)."""
    import shutil
    from pathlib import Path

    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    todo = [t for t in tasks if database.default_seconds(t.dispatched[0]) is None]
    if not todo:
        return
    target = spec.tvm()
    built = builder.build([BuilderInput(schedule_module(t.dispatched[0].clone(), spec)[0], target) for t in todo])
    runs = [(t, b, runner.run([RunnerInput(b.artifact_path, "cpu",  # check_tunable: LLVM
                                           ArgInfo.from_prim_func(t.dispatched[0]["main"]))])[0])
            for t, b in zip(todo, built, strict=True) if b.error_msg is None]
    for t, b in zip(todo, built, strict=True):
        if b.error_msg is not None:
            _LOG.debug("default schedule of %s did not build: %s", t.task_name, b.error_msg)
    for task, b, future in runs:
        result = future.result()
        if result.error_msg is not None:
            _LOG.debug("default schedule of %s did not run: %s", task.task_name, result.error_msg)
        if result.error_msg is None and result.run_secs:
            secs = sum(float(s) for s in result.run_secs) / len(result.run_secs)
            database.mark_default(task.dispatched[0], secs)
        shutil.rmtree(Path(b.artifact_path).parent, ignore_errors=True)
    failed = len(todo) - sum(database.default_seconds(t.dispatched[0]) is not None for t in todo)
    _LOG.info(f"measured graphopt's default schedule of {len(todo) - failed} kernels on the tuning runner"
              + (f" ({failed} failed to build or run: their tuned records apply unchecked)" if failed else ""))


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
    want = [max(0, min(bud.per_task, bud.total) - s) for s in spent]
    left_total = max(0, bud.total - sum(min(s, bud.per_task) for s in spent))
    # its worker processes take seconds to start: only when there is something to tune
    builder = make_builder(spec) if left_total and any(want) else None
    if builder is not None:
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
    results = []
    for n, i in enumerate(order, 1):
        task = tasks[i]
        mod = task.dispatched[0]
        if plan[i] > 0:
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
        results.append(TaskResult(task.task_name, int(task.weight), database.records_for(mod),
                                  database.records_for(mod) - have[i], database.best_seconds(mod),
                                  database.default_seconds(mod), plan[i], database.trials_spent(mod)))
    return results
