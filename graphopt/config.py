"""Build options shared by `graphopt.compile`, the command line and the targets, and the one
coercion rule for enum-valued options.

Every option typed as a `str`-valued `enum.Enum` (capture method, criterion, norm, scope, observer,
optimizer, soft loss) accepts a member, its value or its name, case-insensitively — ``"l1"``,
``"L1"`` and ``Criterion.L1`` are the same — and anything else is refused with one message naming
the choices. Imports nothing of graphopt but its errors.
"""
from __future__ import annotations

import enum
from typing import TypeVar

from graphopt.errors import ConfigError, GraphoptError

E = TypeVar("E", bound=enum.Enum)


def as_enum(cls: type[E], value: object, what: str, error: type[GraphoptError] = ConfigError) -> E:
    """``value`` as a member of ``cls``; ``error`` (default `ConfigError`) names ``what`` and the choices."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        for member in cls:
            if key in (str(member.value).lower(), member.name.lower()):
                return member
    raise error(f"{what}={value!r} is not a known {what}; use one of {[m.value for m in cls]}")


class OptimizeFor(str, enum.Enum):
    """What a build favours where the target offers a choice. Today the choice is the weight storage
    of int8 layers on Cortex-M DSP targets (`graphopt.targets.lowering.int8.WeightStorage`): int16 weights feed
    SMLAD directly (about a third fewer instructions per MAC) but take twice the flash of int8 ones.
    Every mode stays within the board's flash: layers the board cannot hold as int16 keep int8 weights.

    BALANCED (default): int16 for layers of at most ``MAX_WEIGHTS_16`` weights, int8 for larger ones.
    SPEED: int16 for every layer.
    SIZE: int8 for every layer (``compile(..., optimize_for="size")``).
    Targets without such a choice build the same code in every mode (the report says so).
    """

    BALANCED = "balanced"
    SPEED = "speed"
    SIZE = "size"
