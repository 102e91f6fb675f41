"""The program being imported into Relax, as converters see it: its constants and its target.

`importing(ep, spec)` is active while `from_exported_program` imports ``ep`` (the ``import`` phase
of `graphopt.targets.lowering.phases`); inside it `constant_value(arg)` gives the numpy value of a
parameter, buffer or constant argument (so per-channel parameters fold in numpy instead of
becoming Relax ops) and `import_target()` the `TargetSpec` being converted for. Shared by the
converters and the low-bit kernels they emit.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

_CONSTANTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("graphopt_constants", default=None)
_SPEC: contextvars.ContextVar = contextvars.ContextVar("graphopt_import_target", default=None)


@contextlib.contextmanager
def importing(ep, spec=None):
    """While `ep` is imported: its parameters, buffers and constants are readable by converters
    (`constant_value`; per-channel parameters fold in numpy instead of becoming Relax ops), and
    `spec` is the target they convert for (None: target-neutral choices)."""
    values = {**dict(ep.named_parameters()), **dict(ep.named_buffers()), **ep.constants}
    by_name = {s.arg.name: values[s.target] for s in ep.graph_signature.input_specs if s.target in values}
    tokens = _CONSTANTS.set(by_name), _SPEC.set(spec)
    try:
        yield
    finally:
        _CONSTANTS.reset(tokens[0])
        _SPEC.reset(tokens[1])


def import_target():
    """The target the program being imported converts for (inside `importing`), else None."""
    return _SPEC.get()


def constant_value(arg):
    """numpy value of an fx node argument that is a parameter, buffer or constant of the program being
    imported (inside `importing`), else None."""
    constants = _CONSTANTS.get() or {}
    value = constants.get(arg.name) if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" else None
    return None if value is None else value.detach().cpu().numpy()
