"""Capture an `nn.Module` as an ATen-level fx `GraphModule` that graphopt's passes rewrite.

`torch.export` (non-strict) is tried first. If it fails, `fx.symbolic_trace` is tried and its
straight-line module is exported to ATen, so every pass sees one form: `call_function`
nodes on `torch.ops.aten` ops and `get_attr` nodes for parameters and buffers. Right after
either, `canonicalize` inlines ``no_grad``/disabled-autocast regions (`passes/inline_regions.py`)
and rewrites in-place ops into their functional forms (`passes/functionalize.py`); what they
decline stays as captured and is listed in the report.
Refuses: models that neither method captures (one `CaptureError` with both reasons and the
user's source lines), a model that is not an `nn.Module` or an unknown capture method
(`ConfigError`), inputs that are not tensors or have a dimension of size 0, and example inputs
that the model rejects (`InputError`).
`to_exported_program` turns a (rewritten) GraphModule back into an `ExportedProgram` for lowering;
`eval_mode` is how every entry point runs a model in eval mode and gives it back as it came.
"""
from __future__ import annotations

import contextlib
import enum
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx

from graphopt.config import as_enum
from graphopt.errors import (
    CaptureError,
    ConfigError,
    InputError,
    Unsupported,
    first_line,
    quiet_torch_deprecations,
    warn,
)
from graphopt.passes.base import PassContext, Property
from graphopt.passes.manager import PassManager, PassRecord


class CaptureMethod(str, enum.Enum):
    AUTO = "auto"  # torch.export, then fx.symbolic_trace
    EXPORT = "export"
    SYMBOLIC_TRACE = "symbolic_trace"


@dataclass
class Captured:
    graph_module: fx.GraphModule
    method: CaptureMethod
    fallback_reason: str | None = None  # why torch.export was not used, if it was not
    outputs: object = None  # the model's own outputs on the example inputs (the eager reference)
    passes: list[PassRecord] = field(default_factory=list)  # what `canonicalize` did
    properties: frozenset[str] = frozenset()  # graph properties `canonicalize` established


def check_model(model, what: str = "model") -> None:
    """`ConfigError` unless ``model`` is an `nn.Module` (checked before anything calls it)."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{what} must be a torch.nn.Module instance, got {type(model).__name__}; pass the module "
                          "object itself (e.g. MyNet().eval(), not the class MyNet or a state_dict)")


def check_example_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InputError("example_inputs must be a non-empty tuple of tensors, e.g. (torch.randn(1, 3, 224, 224),)")
    bad = [i for i, t in enumerate(example_inputs) if not isinstance(t, torch.Tensor)]
    if bad:
        raise InputError(f"example_inputs[{bad}] are not tensors; graphopt compiles tensor-in, tensor-out models. "
                         "Wrap non-tensor arguments in the model (e.g. a small nn.Module that fixes them).")
    empty = {i: tuple(t.shape) for i, t in enumerate(example_inputs) if t.numel() == 0}
    if empty:
        raise InputError(f"example_inputs {empty} (index: shape) have a dimension of size 0; graphopt builds for "
                         "the example shapes, so give every dimension at least 1 (e.g. batch size 1)")
    return tuple(example_inputs)


def user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and graphopt: where the user's code broke capture."""
    found, tb = None, exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "").partition(".")[0]
        if module not in ("torch", "graphopt") and not tb.tb_frame.f_code.co_filename.startswith("<"):
            found = tb
        tb = tb.tb_next
    if found is None:
        return "unknown location"
    f = traceback.extract_tb(found, limit=1)[0]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def export(model: torch.nn.Module, args: tuple, **kwargs) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args, strict=False)``, quietly (`quiet_torch_deprecations`)."""
    with quiet_torch_deprecations():
        return torch.export.export(model, tuple(args), strict=False, **kwargs)


def strip_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the `_guards_fn` shape-guard call that `ep.module()` inserts; graphopt checks inputs itself."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.graph.lint()
    gm.recompile()
    return gm


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, report_warnings: list[str] | None = None) -> Iterator[None]:
    """``model`` in eval mode for the duration (a `GraphoptWarning`, also appended to
    ``report_warnings``, if it came in training mode); every submodule's mode is restored after."""
    modes = {m: m.training for m in model.modules()}
    if model.training and report_warnings is not None:
        msg = ("model was in training mode; graphopt compiles its eval-mode behaviour (dropout off, BatchNorm "
               "running statistics). Call model.eval() before compile to silence this.")
        warn(msg)
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


def canonicalize(gm: fx.GraphModule, args: tuple) -> tuple[fx.GraphModule, list[PassRecord], frozenset[str]]:
    """The canonical form every pass sees: grad-mode and disabled-autocast regions inlined, in-place
    ops made functional, where each is exact. Returns the graph, the pass records (for the report)
    and the properties established."""
    from graphopt.passes.functionalize import Functionalize
    from graphopt.passes.inline_regions import InlineRegions

    ctx = PassContext(tuple(args), None, {Property.ATEN})
    gm, records = PassManager([InlineRegions(), Functionalize()]).run(gm, ctx)
    return gm, records, frozenset(ctx.properties)


def _via_export(model: torch.nn.Module, args: tuple) -> fx.GraphModule:
    return strip_guards(export(model, args).module())


def _via_symbolic_trace(model: torch.nn.Module, args: tuple) -> fx.GraphModule:
    # The traced module is straight-line Python, which torch.export takes even when the original
    # forward (decorators, Python-level indirection) defeated it; exporting it gives the ATen form.
    return _via_export(fx.symbolic_trace(model), args)


def capture(model: torch.nn.Module, example_inputs, method: CaptureMethod = CaptureMethod.AUTO) -> Captured:
    """Capture ``model`` on ``example_inputs``; see the module docstring."""
    check_model(model)
    method = as_enum(CaptureMethod, method, "capture_method")
    args = check_example_inputs(example_inputs)
    try:
        with torch.no_grad():
            outputs = model(*args)
    except Exception as exc:  # the model itself rejects the inputs: say so, not "capture failed"
        raise InputError(f"the model raised on the example inputs ({first_line(exc)}) at {user_frame(exc)}. "
                         f"Check the number, shapes and dtypes of example_inputs: got "
                         f"{[(tuple(t.shape), str(t.dtype)) for t in args]}.") from exc

    failures: list[Unsupported] = []
    if method in (CaptureMethod.AUTO, CaptureMethod.EXPORT):
        try:
            gm = _via_export(model, args)
        except Exception as exc:
            failures.append(Unsupported(f"torch.export: {first_line(exc)}", user_frame(exc),
                                        "remove data-dependent Python control flow (use torch.where / torch.cond)"))
        else:
            return _captured(gm, args, CaptureMethod.EXPORT, None, outputs)
    if method in (CaptureMethod.AUTO, CaptureMethod.SYMBOLIC_TRACE):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = _via_symbolic_trace(model, args)
        except Exception as exc:
            failures.append(Unsupported(f"fx.symbolic_trace: {first_line(exc)}", user_frame(exc),
                                        "avoid Python control flow on tensor values and calls like int(tensor)"))
        else:
            reason = failures[0].what if failures else None
            return _captured(gm, args, CaptureMethod.SYMBOLIC_TRACE, reason, outputs)
    raise CaptureError(f"could not capture {type(model).__name__} as a graph ({len(failures)} attempt(s) failed):",
                       failures, "graphopt needs a model that torch.export or torch.fx can trace.")


def _captured(gm: fx.GraphModule, args: tuple, method: CaptureMethod, reason: str | None, outputs) -> Captured:
    gm, records, properties = canonicalize(gm, args)
    return Captured(gm, method, reason, outputs, records, properties)


def to_exported_program(gm: fx.GraphModule, example_inputs: tuple, *,
                        decompose: bool = False) -> torch.export.ExportedProgram:
    """Re-export a captured (and rewritten) GraphModule for lowering (``decompose``: with
    `run_decompositions`, the form TVM's importer takes)."""
    ep = export(gm, tuple(example_inputs))
    if not decompose:
        return ep
    with quiet_torch_deprecations():
        return ep.run_decompositions()
