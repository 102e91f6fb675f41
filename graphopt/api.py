"""`graphopt.compile`: capture → passes → support check → TVM lowering → artifact → report.

Refuses, each with one `graphopt` error and nothing written: unknown targets, a model that is not
an `nn.Module`, example inputs the model rejects, a model that returns no tensor, models that
cannot be captured, nodes that no rewrite fits into the target's operator set (`OperatorSetError`,
all listed with the rewrite needed), ops TVM cannot lower (all listed, with source lines), and
(with ``verify=True``) artifacts whose outputs differ from PyTorch beyond ``rtol``.
A model in training mode is compiled in eval mode with a warning; the model object is left in
the mode it came in.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from graphopt.analysis import analyze
from graphopt.artifact import TensorSpec, write_manifest
from graphopt.capture import (
    CaptureMethod,
    capture,
    check_example_inputs,
    check_model,
    to_exported_program,
)
from graphopt.compiled import CompiledModel, new_build_dir
from graphopt.config import OptimizeFor, as_enum
from graphopt.errors import ConfigError, InputError, LoweringError, NumericsError
from graphopt.legalize import raise_if_unfit, run_legalization
from graphopt.passes.base import GraphPass, PassContext, Property
from graphopt.pipeline import PassManager, default_passes, flat_outputs, max_rel_error
from graphopt.progress import Steps
from graphopt.report import Report
from graphopt.support import unsupported_ops
from graphopt.targets import TargetSpec, get_target
from graphopt.targets.backend import backend_for
from graphopt.targets.int8 import WeightStorage, summarize_storage, weight_storage

if TYPE_CHECKING:
    from graphopt.prune import PruneConfig


class GraphoptWarning(UserWarning):
    pass


def c_identifier(name: str, *, explicit: bool) -> str:
    """``ResidualCNN`` → ``residual_cnn``; an explicit name must already be a C identifier."""
    if explicit:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
            raise ConfigError(f"name={name!r} must be a C identifier (letters, digits, _; not starting with a digit)")
        return name
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    snake = re.sub(r"[^a-z0-9_]+", "_", snake).strip("_") or "model"
    return snake if not snake[0].isdigit() else f"m_{snake}"


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module, report_warnings: list[str]):
    modes = {m: m.training for m in model.modules()}
    if model.training:
        msg = ("model was in training mode; graphopt compiles its eval-mode behaviour (dropout off, BatchNorm "
               "running statistics). Call model.eval() before compile to silence this.")
        warnings.warn(msg, GraphoptWarning, stacklevel=4)
        report_warnings.append(msg)
    try:
        model.eval()
    except NotImplementedError:  # torch.export'ed modules (e.g. PT2E-converted) refuse eval(); export fixed their mode
        pass
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def compile(model: torch.nn.Module, example_inputs, target: str | TargetSpec = "arm", *,
            passes: list[GraphPass] | None = None, verify: bool = False, rtol: float = 1e-4,
            capture_method: CaptureMethod = CaptureMethod.AUTO, count_instructions: bool | None = None,
            progress: bool = True, prune: PruneConfig | None = None, name: str | None = None,
            approximate: bool = False, database: str | Path | None = None,
            optimize_for: OptimizeFor | str = OptimizeFor.BALANCED) -> CompiledModel:
    """Compile ``model`` for ``target``; see the module docstring.

    passes:             fx passes to run (default: identity removal, BN folding, dead code).
    verify:             run the artifact on the example inputs (emulated for ARM) and check it
                        against PyTorch; also checks numerics after every pass.
    count_instructions: on emulated targets, measure instructions per inference under QEMU
                        (default: on for emulated targets).
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
    """
    spec = get_target(target)
    optimize_for = as_enum(OptimizeFor, optimize_for, "optimize_for")
    check_model(model)
    args = check_example_inputs(example_inputs)
    c_name = c_identifier(name if name is not None else type(model).__name__, explicit=name is not None)
    steps = Steps(progress)
    report = Report(model=type(model).__name__, target=spec.to_dict())
    if prune is not None:
        from graphopt.prune import prune_for_compile

        model, report.pruning = prune_for_compile(model, args, prune, spec)

    with _eval_mode(model, report.warnings):
        with steps.phase("capture"):
            captured = capture(model, args, capture_method)
            reference = captured.outputs
    if not flat_outputs(reference):
        raise InputError(f"{type(model).__name__} returned no tensor on the example inputs (got "
                         f"{type(reference).__name__}); graphopt compiles models whose forward returns tensors "
                         "(a tensor, or a tuple/list/dict of them)")
    report.capture_method = captured.method.value
    report.capture_fallback_reason = captured.fallback_reason
    gm = captured.graph_module
    cost = analyze(gm, args)
    report.params_before, report.macs_before = cost.params, cost.macs

    with steps.phase("passes"):
        ctx = PassContext(args, spec, {Property.ATEN, Property.INFERENCE} | captured.properties)
        gm, records = PassManager(default_passes() if passes is None else passes,
                                  verify=verify, rtol=rtol).run(gm, ctx)
        report.passes = captured.passes + records
    if not spec.ops.unrestricted:
        with steps.phase("legalize", f"for the {spec.ops.name} operator set"):
            gm, records, report.legalized, unfit = run_legalization(gm, ctx, approximate=approximate,
                                                                    verify=verify, rtol=rtol)
            report.passes += records
            raise_if_unfit(unfit, report.model, spec)
    cost = analyze(gm, args)
    report.params_after, report.param_bytes_after, report.macs_after = cost.params, cost.param_bytes, cost.macs
    report.macs_by_module, report.macs_by_precision = cost.macs_by_module, cost.macs_by_precision

    with steps.phase("export"):
        ep = to_exported_program(gm, args).run_decompositions()
        missing = unsupported_ops(ep)
        if missing:
            raise LoweringError(f"{len(missing)} operator(s) in {report.model} cannot be lowered for {spec.name}:",
                                missing, "Nothing was built.")

    backend = backend_for(spec)
    tuning = contextlib.nullcontext()
    if database is not None:
        from graphopt.targets.tuning import applying
        from graphopt.targets.tuning_db import open_database

        db = open_database(database, writable=False)
        report.warnings += [f"tuning database line skipped: {d}" for d in db.damaged]
        tuning = applying(db)
    inputs = [TensorSpec.of(f"input{i}", t) for i, t in enumerate(args)]
    outputs = [TensorSpec.of(f"output{i}", t) for i, t in enumerate(flat_outputs(reference))]
    build_dir = new_build_dir()
    try:
        with steps.phase("lower and build", f"for {spec.name}"), tuning, \
                weight_storage(WeightStorage(optimize_for)) as storage:
            built = backend.build(ep, spec, build_dir, inputs, outputs,
                                  progress=lambda phase: steps.say(f"  {phase}"), name=c_name)
        report.lowering = built.lowering
        report.lowering.setdefault("optimize_for", optimize_for.value)
        report.lowering.setdefault("weight_storage", summarize_storage(storage))
        manifest = {**built.manifest, "target": spec.to_dict(), "runtime": spec.runtime.value,
                    "inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs],
                    "single_output": isinstance(reference, torch.Tensor)}
        write_manifest(build_dir, manifest)
        if prune is not None and prune.sparse_storage:
            from graphopt.sparsity import save_sparse

            report.pruning["sparse_storage"] = save_sparse(model, build_dir / "weights.sparse.npz")
        cm = CompiledModel(spec, build_dir, manifest, report)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise

    if verify:
        with steps.phase("verify", "(emulated)" if spec.is_emulated else ""):
            got = cm(*args)
            err = max_rel_error(got, reference)
            report.verification = {"max_rel_error": err, "rtol": rtol,
                                   "ran_on": f"qemu {spec.qemu_cpu or spec.qemu_machine}" if spec.is_emulated else "host"}
            if err > rtol:
                raise NumericsError(f"the compiled artifact differs from PyTorch by {err:.3g} relative to output "
                                    f"scale (tolerance {rtol:g}) on {spec.name}. Please report this model.")
    if spec.is_emulated and (count_instructions if count_instructions is not None else True):
        with steps.phase("count instructions", f"(qemu {spec.qemu_cpu or spec.qemu_machine})"):
            m = backend.measure(build_dir, spec, cm._check_inputs(args))
            report.instructions_per_inference, report.instructions_note = m.instructions_per_inference, m.note
            layers = report.lowering.get("layers")
            if m.per_call is not None and layers is not None and len(m.per_call) == len(layers):
                for layer, n in zip(layers, m.per_call):
                    layer["instructions"] = n
    report.timings = dict(steps.timings)
    report.artifact_files = {p.relative_to(build_dir).as_posix(): p.stat().st_size
                             for p in sorted(build_dir.rglob("*")) if p.is_file()}
    (build_dir / "report.json").write_text(report.to_json())
    (build_dir / "report.md").write_text(report.to_markdown())
    return cm
