"""Build options shared by `graphopt.compile`, the command line and the targets."""
from __future__ import annotations

import enum

from graphopt.errors import ConfigError


def as_enum(cls: type[enum.Enum], value, what: str):
    """``value`` as a member of ``cls`` (members, values and names accepted, case-insensitive)."""
    if isinstance(value, cls):
        return value
    for m in cls:
        if isinstance(value, str) and value.lower() in (m.value.lower(), m.name.lower()):
            return m
    raise ConfigError(f"unknown {what} {value!r}; choose one of {[m.value for m in cls]}")


class OptimizeFor(str, enum.Enum):
    """What a build favours where the target offers a choice. Today the choice is the weight storage
    of int8 layers on Cortex-M DSP targets (`graphopt.targets.int8.WeightStorage`): int16 weights feed
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
