"""graphopt's exceptions and warnings. Every user-facing failure is one of these, with what to do next.

The base of the house: this module imports nothing of graphopt, and no other module defines an
error or warning class a user can see.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class ConfigError(GraphoptError, ValueError):
    """An option, spec or argument is invalid."""


class UnknownTargetError(ConfigError, KeyError):
    """A target name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0] if self.args else ""


class InputError(GraphoptError, ValueError):
    """Example inputs that do not fit the model (count, shape, dtype)."""


@dataclass(frozen=True)
class Unsupported:
    """One unsupported op or construct, where it comes from, and what to try."""

    what: str
    where: str
    hint: str = ""

    def __str__(self) -> str:
        s = f"  - {self.what}  [{self.where}]"
        return s + (f"\n      try: {self.hint}" if self.hint else "")


class UnsupportedModelError(GraphoptError):
    """The model cannot be captured or lowered; ``items`` lists every offending op."""

    def __init__(self, summary: str, items: list[Unsupported], advice: str = ""):
        self.summary = summary
        self.items = list(items)
        self.advice = advice
        body = "\n".join(str(i) for i in self.items)
        super().__init__(f"{summary}\n{body}" + (f"\n{advice}" if advice else ""))


class CaptureError(UnsupportedModelError):
    """Neither torch.export nor fx.symbolic_trace could capture the model."""


class LoweringError(UnsupportedModelError):
    """TVM could not import or build the captured graph."""


class OperatorSetError(UnsupportedModelError):
    """Nodes that no rewrite fits into the target's operator set; ``items`` lists each one."""


class ToolchainError(GraphoptError):
    """A cross compiler, emulator or runtime library is missing or failed."""


class ArtifactError(GraphoptError):
    """An artifact could not be written or loaded."""


class NumericsError(GraphoptError):
    """A pass or a build changed the model's outputs beyond tolerance."""


class PassError(GraphoptError):
    """A pass's requirements are not met, or a pass failed."""


class QuantizationError(GraphoptError, ValueError):
    """A quantization scheme, calibration set or model state that graphopt cannot quantize."""


class TuningError(GraphoptError):
    """Tuning cannot start or continue (bad target, runner, or budget)."""


class TuningDatabaseError(ConfigError):
    """A tuning database folder that cannot be opened as asked."""


class GraphoptWarning(UserWarning):
    """Something graphopt did differently from what was asked (eval mode instead of training mode,
    a pruning budget not met); the report records the same fact."""


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` — how graphopt quotes an exception it wraps."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


_OWN_FRAMES = ("graphopt", "contextlib", "functools")  # graphopt's code and the stdlib wrappers it calls through


def warn(message: str) -> None:
    """Give a `GraphoptWarning` attributed to the user's line: the first caller outside graphopt."""
    depth, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _OWN_FRAMES:
        depth, frame = depth + 1, frame.f_back
    warnings.warn(message, GraphoptWarning, stacklevel=depth + 1)


@contextlib.contextmanager
def quiet_torch_deprecations() -> Iterator[None]:
    """Silence the deprecation warning torch 2.13's own pytree code gives on every export,
    decomposition and import into TVM (not actionable by anyone calling graphopt); graphopt scopes
    this to its own calls instead of filtering warnings process-wide."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        yield
