"""`graphopt.tune`: MetaSchedule autotuning into a persistent, crash-safe database folder.

    summary = graphopt.tune(model, (x,), target="host", trials=500, database="tuning/host/")
    cm = graphopt.compile(model, (x,), target="host", database="tuning/host/")

capture → default passes → export → lowering phases through fuse → one MetaSchedule task per
distinct fused kernel → tuning with a model budget (``trials``) and a per-kernel budget
(``trials_per_task``, default ``ceil(trials / kernels)``) → records appended durably to the
folder (see `graphopt.targets.tuning.database`). Records already in the folder count toward both
budgets, so re-running after Ctrl-C or kill -9 resumes; kernels shared with another model are
not tuned again; a finished budget is not run again (trials the search had no new candidate for
count as spent). Before tuning, graphopt's default schedule of every kernel is measured on the
same runner, and after tuning each best record is timed against it again in paired rounds (the
same load on both): ``compile(database=...)`` applies a kernel's best record only where it beat that
default (``report.lowering["default_kept"]`` lists the others), so a tuned model is never slower
per kernel than the untuned one; the default schedules cover every kernel the database lacks.
The budget goes to kernels in order of their share of the model's default time. Tensorized int8 dot
kernels are tuned over their register tiles and loop orders (`metaschedule.tune_dot_task`), the
other kernels by MetaSchedule's search.

Runners: ``"local"`` (time on this machine; host targets), `RPCRunner` (boards registered with a
TVM RPC tracker; the builder cross-compiles; a `graphopt.targets.tuning.rpc.EmulatedDevice` tells the
tracker it is emulated, and its times are labelled as not real speeds), ``"emulated-icount"`` (a
PROXY: guest instructions under ``qemu -cpu <target cpu>``, deterministic, not a speed). Refuses
(`TuningError`): untunable
targets, a runner that cannot run the target's code, non-positive budgets; a model that is not an
`nn.Module` (`ConfigError`) and a database folder that cannot be written (`TuningDatabaseError`),
both before any slow step.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphopt.errors import ConfigError, ToolchainError, TuningError
from graphopt.passes.capture import check_example_inputs, check_model
from graphopt.passes.legalization import raise_if_unfit
from graphopt.passes.pipeline import Pipeline
from graphopt.progress import LOG, phase, shown
from graphopt.targets import TargetSpec, get_target, list_targets
from graphopt.targets.tuning.database import check_folder, open_database
from graphopt.targets.tuning.metaschedule import TaskResult, budget, check_tunable, extract, fused_module, tune_tasks

__all__ = ["RPCRunner", "TuningError", "TuningSummary", "tune", "exported_for_tuning"]


@dataclass(frozen=True)
class RPCRunner:
    """Measure on devices registered with a TVM RPC tracker under ``key`` (``tracker="host:port"``).

    Start one with ``python -m tvm.exec.rpc_tracker --port 9190`` and, on each board,
    ``python -m tvm.exec.rpc_server --tracker host:9190 --key rk3399``.
    """

    tracker: str
    key: str
    session_timeout: float = 120.0
    number: int = 3
    repeat: int = 1
    min_repeat_ms: int = 0
    max_workers: int = 1

    def __post_init__(self) -> None:
        host, _, port = self.tracker.rpartition(":") if isinstance(self.tracker, str) else ("", "", "")
        if not host or not port.isdigit():
            raise ConfigError(f"RPCRunner tracker must look like 'host:9190', got {self.tracker!r}")
        if not self.key:
            raise ConfigError("RPCRunner needs the device key the boards registered with")

    @property
    def host(self) -> str:
        return self.tracker.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.tracker.rpartition(":")[2])


@dataclass
class TuningSummary:
    """What a `tune` session did. ``unit`` says what ``best_seconds`` means for its runner."""

    target: str
    database: Path
    runner: str
    trials_budget: int
    trials_per_task: int
    tasks: list[TaskResult]
    seconds: float
    damaged_lines: list[str] = field(default_factory=list)
    unreadable_lines: list[str] = field(default_factory=list)  # whole lines TVM cannot rebuild here (kept)
    proxy: bool = False  # True: scores are instruction counts under emulation, not times
    emulated: bool = False  # True: times measured on an emulated RPC device, not real speeds

    @property
    def new_trials(self) -> int:
        return sum(t.new_trials for t in self.tasks)

    @property
    def already_spent(self) -> bool:
        """True when earlier sessions in the database had spent the whole budget: nothing ran."""
        return not any(t.planned for t in self.tasks)

    def to_markdown(self) -> str:
        from graphopt.targets.tuning.rpc import EMULATED_NOTE

        what = "instructions (PROXY, qemu)" if self.proxy else "best time (EMULATED)" if self.emulated else "best time"
        lines = [f"## Tuning: {self.target} via {self.runner}", "",
                 *([f"**{EMULATED_NOTE}.**", ""] if self.emulated else []),
                 f"- database: {self.database}", f"- budget: {self.trials_budget} trials, at most "
                 f"{self.trials_per_task} per kernel; {self.new_trials} measured in {self.seconds:.0f} s",
                 *(["- nothing to do: earlier sessions in this folder already spent the budget (records and "
                    "finished trials count); raise trials to tune further"] if self.already_spent else []),
                 "", f"| kernel | weight | records | new | trials spent | {what} | default schedule | compile uses |",
                 "|---|---|---|---|---|---|---|---|"]
        for t in self.tasks:
            lines.append(f"| {t.name} | {t.weight} | {t.trials} | {t.new_trials} | {t.spent} | "
                         f"{_unit(t.best_seconds, self.proxy, self.emulated)} | "
                         f"{_unit(t.default_seconds, self.proxy, self.emulated)} | "
                         f"{'tuned' if t.uses_tuned else 'default'} |")
        if self.damaged_lines:
            lines += ["", "Damaged database lines skipped (moved to *.damaged):"]
            lines += [f"- {d}" for d in self.damaged_lines]
        if self.unreadable_lines:
            lines += ["", "Database lines this process cannot use (kept in the files; e.g. another graphopt "
                      "version's kernels):"]
            lines += [f"- {d}" for d in self.unreadable_lines]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


def _unit(seconds: float | None, proxy: bool, emulated: bool = False) -> str:
    if seconds is None or seconds >= 1e9:
        return "-"
    if proxy:
        return f"{seconds * 1e9:,.0f} instr (proxy)"
    shown = f"{seconds * 1e6:.2f} µs" if seconds < 1e-4 else f"{seconds * 1e3:.3f} ms"
    return shown + (" (emulated)" if emulated else "")


def exported_for_tuning(model: torch.nn.Module, args: tuple, spec: TargetSpec):
    """The ExportedProgram `graphopt.compile` lowers for `model` with default passes (the same `Pipeline`)."""
    pipe = Pipeline(model, args, spec)
    raise_if_unfit(pipe.legalized.unfit, type(model).__name__, spec)
    return pipe.exported


def _runner(runner, spec: TargetSpec):
    """(MetaSchedule runner, label, proxy?, emulated?) for the user's runner choice."""
    from tvm.s_tir import meta_schedule as ms

    if isinstance(runner, RPCRunner):
        from graphopt.targets.tuning.rpc import emulated_devices

        try:
            emulated = emulated_devices(runner.tracker, runner.key)
        except ToolchainError as e:
            raise TuningError(str(e)) from e
        cfg = ms.runner.RPCConfig(tracker_host=runner.host, tracker_port=runner.port, tracker_key=runner.key,
                                  session_timeout_sec=int(runner.session_timeout))
        ev = ms.runner.EvaluatorConfig(number=runner.number, repeat=runner.repeat, min_repeat_ms=runner.min_repeat_ms)
        label = f"rpc {runner.key}@{runner.tracker}" + (f" (EMULATED: {emulated[0]})" if emulated else "")
        return (ms.runner.RPCRunner(rpc_config=cfg, evaluator_config=ev, max_workers=runner.max_workers),
                label, False, bool(emulated))
    if runner == "local":
        if spec.cross_compiler or spec.is_emulated:
            raise TuningError(f"runner='local' times code on this machine, but {spec.name} code runs elsewhere; "
                              "use graphopt.RPCRunner(...) for boards or runner='emulated-icount' (a proxy)")
        # the runner's workers use the threads the compiled model will (`NativeVM.run` sets the same)
        os.environ.setdefault("TVM_NUM_THREADS", str(spec.num_cores))
        ev = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=10, enable_cpu_cache_flush=False)
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=ev), "local", False, False
    if runner == "emulated-icount":
        from graphopt.targets.tuning.icount import IcountRunner

        return IcountRunner.create(spec), f"emulated-icount (qemu -cpu {spec.qemu_cpu}, PROXY)", True, False
    raise ConfigError(f"runner must be 'local', 'emulated-icount' or a graphopt.RPCRunner, got {runner!r}")


def _refuse_c_library(spec: TargetSpec) -> None:
    """A runtime-free C library target has no runner to time its kernels alone; its records come from the target
    that builds the same kernels for the same CPU through the TVM VM (e.g. arm-a55 for arm-a55-c), if any."""
    if not spec.is_c_library:
        return

    def llvm(t: TargetSpec) -> dict:  # the LLVM target without the thread count
        return {k: v for k, v in t.tvm_target.items() if k != "num-cores"}

    twins = [t.name for t in list_targets() if not t.is_c_library and llvm(t) == llvm(spec)]
    then = (f"tune for {twins[0]!r} (the same CPU and kernels through the TVM VM) and compile for {spec.name!r} "
            "with database= that folder" if twins else "compile uses graphopt's default schedules")
    raise TuningError(f"target {spec.name!r} builds a runtime-free C library, which has no runner to time its "
                      f"kernels; {then}")


def tune(model: torch.nn.Module, example_inputs, target: str | TargetSpec = "host", *, trials: int = 200,
         database: str | Path | None = None, runner="local", trials_per_task: int | None = None,
         progress: bool = True, seed: int = 0) -> TuningSummary:
    """Tune `model`'s kernels for `target`; see the module docstring.

    database: the folder (default ``tuning/<target>/``); created if missing, reused if present.
    Ctrl-C stops the session; every record measured so far is kept and the next call resumes.
    """
    spec = get_target(target)
    check_tunable(spec)
    _refuse_c_library(spec)
    budget(trials, 1, trials_per_task)  # refuse a bad budget, model or folder before the slow steps
    check_model(model)
    args = check_example_inputs(example_inputs)
    folder = check_folder(database if database is not None else Path("tuning") / spec.name)
    with shown(progress):
        start = time.perf_counter()
        ms_runner, label, proxy, emulated = _runner(runner, spec)
        ep = exported_for_tuning(model, args, spec)
        with phase("lower to fused kernels", f"for {spec.name}"):
            tasks = extract(fused_module(ep, spec), spec)
        if not tasks:
            raise TuningError(f"{type(model).__name__} has no kernels to tune on {spec.name}")
        bud = budget(trials, len(tasks), trials_per_task)
        db = open_database(folder, writable=True)
        try:
            for d in db.damaged:
                LOG.info("database damage skipped: %s", d)
            for d in db.unreadable:
                LOG.info("database line not usable here, kept: %s", d)
            with phase("tune", f"via {label}"):
                results = tune_tasks(tasks, spec, db, bud, ms_runner, unit=lambda s: _unit(s, proxy, emulated),
                                     seed=seed)
        finally:
            db.close()
        summary = TuningSummary(spec.name, folder, label, bud.total, bud.per_task, results,
                                time.perf_counter() - start, damaged_lines=[str(d) for d in db.damaged],
                                unreadable_lines=[str(d) for d in db.unreadable], proxy=proxy, emulated=emulated)
        LOG.info("tuned %d kernels: %d new trials in %.0f s (print the returned summary for the table)",
                 len(results), summary.new_trials, summary.seconds)
    return summary
