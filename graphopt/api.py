"""`graphopt.compile` and `graphopt.check`: the graph side (`graphopt.passes.pipeline.Pipeline`:
capture → passes → legalization → export), then — for compile — TVM lowering → artifact → report.

Refuses, each with one `graphopt` error and nothing written: unknown targets, a model that is not
an `nn.Module`, example inputs the model rejects, a model that returns no tensor, models that
cannot be captured, nodes that no rewrite fits into the target's operator set (`OperatorSetError`,
all listed with the rewrite needed), ops TVM cannot lower (all listed, with source lines), and
(with ``verify=True``) artifacts whose outputs differ from PyTorch beyond ``rtol``.
A model in training mode is compiled in eval mode with a warning; the model object is left in
the mode it came in. `check` is the dry run: the same graph side, its answer a `CheckResult`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from graphopt.artifact import TensorSpec, read_manifest, write_manifest
from graphopt.build_cache import BuildCache
from graphopt.compiled import CompiledModel, new_build_dir
from graphopt.config import OptimizeFor, as_enum
from graphopt.errors import ConfigError, LoweringError, NumericsError
from graphopt.ops import DATA_MOVEMENT, op_kind
from graphopt.passes.base import GraphPass
from graphopt.passes.capture import CaptureMethod, check_example_inputs, check_model
from graphopt.passes.legalization import raise_if_unfit
from graphopt.passes.manager import flat_outputs, max_rel_error
from graphopt.passes.pipeline import Pipeline
from graphopt.progress import phase, shown
from graphopt.report import Report
from graphopt.targets import TargetSpec, get_target
from graphopt.targets.backends.registry import backend_for
from graphopt.targets.lowering.int8 import WeightStorage, summarize_storage, weight_storage
from graphopt.targets.lowering.support import unsupported_ops
from graphopt.targets.lowering.tuned import applying
from graphopt.targets.tuning.database import open_database

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from graphopt.pruning import PruneConfig


def c_identifier(name: str, *, explicit: bool) -> str:
    """``ResidualCNN`` → ``residual_cnn``; an explicit name must already be a C identifier."""
    if explicit:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
            raise ConfigError(f"name={name!r} must be a C identifier (letters, digits, _; not starting with a digit)")
        return name
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    snake = re.sub(r"[^a-z0-9_]+", "_", snake).strip("_") or "model"
    return snake if not snake[0].isdigit() else f"m_{snake}"


def compile(model: torch.nn.Module, example_inputs, target: str | TargetSpec = "arm", *,
            passes: list[GraphPass] | None = None, verify: bool = False, rtol: float = 1e-4,
            capture_method: CaptureMethod = CaptureMethod.AUTO, count_instructions: bool | None = None,
            progress: bool = True, prune: PruneConfig | None = None, name: str | None = None,
            approximate: bool = False, database: str | Path | None = None,
            optimize_for: OptimizeFor | str = OptimizeFor.BALANCED, cache: bool = True) -> CompiledModel:
    """Compile ``model`` for ``target``; see the module docstring.

    passes:             fx passes to run (default: identity removal, BN folding, dead code).
    verify:             run the artifact on the example inputs (emulated for ARM) and check it
                        against PyTorch; also checks numerics after every pass.
    count_instructions: on emulated targets, measure instructions per inference under QEMU
                        (default: on for emulated targets).
    progress:           log each phase (`graphopt.progress`; the CLI's --quiet turns it off).
    name:               C identifier for the artifact's symbols (``graphopt_<name>_run``); default:
                        the model's class name in snake case.
    prune:              a `graphopt.PruneConfig`: prune a copy of the model first (channels rounded to
                        the target's ``channel_multiple``); ``report.pruning`` says what was removed.
    approximate:        allow declared approximations (e.g. GELU, SiLU, sigmoid, tanh) where the target's
                        operator set lacks an op; ``report.legalized`` lists every rewrite and its error.
    database:           a `graphopt.tune` database folder: its tuned kernels are used, the default schedules
                        cover the rest; ``report.lowering["from_database"]`` names the tuned ones.
    optimize_for:       `graphopt.OptimizeFor` ("balanced", "speed", "size"): where the target offers a choice
                        (Cortex-M DSP: int16 or int8 weights per layer), what to favour within the board's
                        flash; ``report.lowering["weight_storage"]`` lists each layer's storage and why.
    cache:              reuse the artifact of an identical earlier build (`graphopt.build_cache`: same graph,
                        target, options and software) instead of lowering again; ``report.build_cache``
                        says whether it hit. Off for the whole process with ``GRAPHOPT_BUILD_CACHE=off``.
    """
    spec = get_target(target)
    optimize_for = as_enum(OptimizeFor, optimize_for, "optimize_for")
    check_model(model)
    args = check_example_inputs(example_inputs)
    c_name = c_identifier(name if name is not None else type(model).__name__, explicit=name is not None)
    report = Report(model=type(model).__name__, target=spec.to_dict())
    with shown(progress):
        return _compile(model, args, spec, report, c_name, passes=passes, verify=verify, rtol=rtol,
                        capture_method=capture_method, count_instructions=count_instructions, prune=prune,
                        approximate=approximate, database=database, optimize_for=optimize_for,
                        cache=BuildCache.from_environment() if cache else None)


def _compile(model, args, spec: TargetSpec, report: Report, c_name: str, *, passes, verify, rtol, capture_method,
             count_instructions, prune, approximate, database, optimize_for: OptimizeFor,
             cache: BuildCache | None) -> CompiledModel:
    pruning = None
    if prune is not None:
        from graphopt.pruning import prune_for_compile

        with phase("prune", timings=report.timings):
            model, pruning = prune_for_compile(model, args, prune, spec)
    pipe = Pipeline(model, args, spec, passes=passes, capture_method=capture_method, verify=verify, rtol=rtol,
                    approximate=approximate, timings=report.timings, warnings=report.warnings)
    captured = pipe.captured
    reference = captured.outputs
    report.capture_method = captured.method.value
    report.capture_fallback_reason = captured.fallback_reason
    report.params_before, report.macs_before = pipe.cost_before.params, pipe.cost_before.macs
    if pruning is not None:  # the pruned model's cost is what the pipeline captured
        pruning.macs_after, pruning.params_after = pipe.cost_before.macs, pipe.cost_before.params
        report.pruning = pruning.to_dict()
    report.passes = list(pipe.optimized.records)
    legalized = pipe.legalized
    report.passes += legalized.records
    report.legalized = legalized.rewrites
    raise_if_unfit(legalized.unfit, report.model, spec)
    cost = pipe.cost_after
    report.params_after, report.param_bytes_after, report.macs_after = cost.params, cost.param_bytes, cost.macs
    report.macs_by_module, report.macs_by_precision = cost.macs_by_module, cost.macs_by_precision

    backend = backend_for(spec)
    tuning: contextlib.AbstractContextManager = contextlib.nullcontext()
    if database is not None:
        db = open_database(database, writable=False)
        report.warnings += [f"tuning database line skipped: {d}" for d in db.damaged]
        report.warnings += [f"tuning database line not usable here (kept in the file): {d}" for d in db.unreadable]
        tuning = applying(db)
    inputs = [TensorSpec.of(f"input{i}", t) for i, t in enumerate(args)]
    outputs = [TensorSpec.of(f"output{i}", t) for i, t in enumerate(flat_outputs(reference))]
    manifest = {"target": spec.to_dict(), "runtime": spec.runtime.value, "inputs": [s.to_dict() for s in inputs],
                "outputs": [s.to_dict() for s in outputs], "single_output": isinstance(reference, torch.Tensor)}
    build_dir = new_build_dir()
    try:
        options = {"name": c_name, "optimize_for": optimize_for.value, **manifest}
        key, hit = _cached_build(cache, legalized.graph_module, spec, options, database, build_dir, report)
        if hit is None:
            ep = pipe.exported
            missing = unsupported_ops(ep)
            if missing:
                raise LoweringError(f"{len(missing)} operator(s) in {report.model} cannot be lowered for "
                                    f"{spec.name}:", missing, "Nothing was built.")
            with phase("lower and build", f"for {spec.name}", timings=report.timings), tuning, \
                    weight_storage(WeightStorage(optimize_for)) as storage:
                built = backend.build(ep, spec, build_dir, inputs, outputs, name=c_name)
            report.lowering = built.lowering
            report.lowering.setdefault("optimize_for", optimize_for.value)
            report.lowering.setdefault("weight_storage", summarize_storage(storage))
            manifest = {**built.manifest, **manifest}
            write_manifest(build_dir, manifest)
            if cache is not None and key is not None:
                _store_build(cache, key, build_dir, report)
        else:
            report.lowering = hit["lowering"]
            manifest = read_manifest(build_dir)
        if prune is not None and prune.sparse_storage:
            from graphopt.sparsity import save_sparse

            report.pruning["sparse_storage"] = save_sparse(model, build_dir / "weights.sparse.npz")
        cm = CompiledModel(spec, build_dir, manifest, report)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise

    if verify:
        with phase("verify", "(emulated)" if spec.is_emulated else "", timings=report.timings):
            got = cm(*args)
            err = max_rel_error(got, reference)
            ran_on = f"qemu {spec.qemu_cpu or spec.qemu_machine}" if spec.is_emulated else "host"
            report.verification = {"max_rel_error": err, "rtol": rtol, "ran_on": ran_on}
            if err > rtol:
                raise NumericsError(f"the compiled artifact differs from PyTorch by {err:.3g} relative to output "
                                    f"scale (tolerance {rtol:g}) on {spec.name}. Please report this model.")
    if spec.is_emulated and (count_instructions if count_instructions is not None else True):
        with phase("count instructions", f"(qemu {spec.qemu_cpu or spec.qemu_machine})",
                            timings=report.timings):
            m = backend.measure(build_dir, spec, cm.check_inputs(args))
            report.instructions_per_inference, report.instructions_note = m.instructions_per_inference, m.note
            layers = report.lowering.get("layers")
            if m.per_call is not None and layers is not None and len(m.per_call) == len(layers):
                for layer, n in zip(layers, m.per_call, strict=True):
                    layer["instructions"] = n
    report.artifact_files = {p.relative_to(build_dir).as_posix(): p.stat().st_size
                             for p in sorted(build_dir.rglob("*")) if p.is_file()}
    (build_dir / "report.json").write_text(report.to_json())
    (build_dir / "report.md").write_text(report.to_markdown())
    return cm


def _cached_build(cache: BuildCache | None, gm, spec: TargetSpec, options: dict, database, build_dir: Path,
                  report: Report) -> tuple[str | None, dict | None]:
    """(key, stored data) of a cache hit copied into ``build_dir``; (key or None, None) on a miss."""
    if cache is None:
        report.build_cache = {"used": False}
        return None, None
    with phase("build cache", "lookup", timings=report.timings):
        key = cache.key(gm, spec.to_dict(), options, Path(database) if database is not None else None)
        hit = cache.fetch(key, build_dir) if key is not None else None
    report.build_cache = {"used": key is not None, "hit": hit is not None, "key": key, "folder": str(cache.folder)}
    if key is None:
        report.build_cache["why"] = "the graph calls a function or module of the user's, or holds a non-tensor"
    elif hit is not None:
        log.info("build cache hit %s: nothing to lower or compile", key[:12])
    return key, hit


def _store_build(cache: BuildCache, key: str, build_dir: Path, report: Report) -> None:
    try:
        with phase("build cache", "store", timings=report.timings):
            cache.store(key, build_dir, {"lowering": json.loads(json.dumps(report.lowering, default=str))})
    except OSError as exc:
        report.warnings.append(f"build cache not written ({exc}); the next compile of this model builds again")


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
    spec = get_target(target)
    pipe = Pipeline(model, example_inputs, spec, approximate=approximate)
    legalized = pipe.legalized
    unfit = legalized.unfit or unsupported_ops(pipe.exported)
    kinds = Counter(k for n in legalized.graph_module.graph.nodes if (k := op_kind(n)) and k not in DATA_MOVEMENT)
    return CheckResult(type(model).__name__, spec.name, spec.ops.name, approximate, dict(kinds), legalized.rewrites,
                       unfit)
