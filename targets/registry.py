"""Target registry: `register_target`, `get_target`, `list_targets`.

Names and aliases share one namespace; registering a clashing name is refused. Unknown names
raise `UnknownTargetError` suggesting the closest names and listing every known target; a target
that is neither a name nor a `TargetSpec` raises `ConfigError`. The built-in targets are listed in
`builtin_targets` (their specs are data in host.py, cortex_a.py, cortex_m.py, armv7.py); user
targets register the same way with `register_target`, with no change here.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable

from graphopt.errors import ConfigError, UnknownTargetError
from graphopt.targets import armv7, cortex_a, cortex_m, host
from graphopt.targets.spec import TargetSpec

_SPECS: dict[str, TargetSpec | Callable[[], TargetSpec]] = {}
_ALIASES: dict[str, str] = {}


def register_target(spec: TargetSpec | Callable[[], TargetSpec], *, name: str | None = None,
                    aliases: tuple = (), replace: bool = False) -> None:
    """Register a spec, or a zero-argument factory (for specs that probe the machine, like ``host``).

    A factory needs ``name=``; it is called once, on first `get_target`.
    """
    if isinstance(spec, TargetSpec):
        name, aliases = spec.name, tuple(spec.aliases) + tuple(aliases)
    elif not callable(spec):
        raise ConfigError(f"register_target takes a graphopt.TargetSpec or a zero-argument factory returning one, "
                          f"got {type(spec).__name__}")
    elif name is None:
        raise ConfigError("register_target(factory) needs name=")
    for key in (name, *aliases):
        owner = _ALIASES.get(key, key if key in _SPECS else None)
        if owner is not None and owner != name and not replace:
            raise ConfigError(f"target name {key!r} is already taken by {owner!r}; pass replace=True to override")
    if name in _SPECS and not replace:
        raise ConfigError(f"target {name!r} is already registered; pass replace=True to override")
    _SPECS[name] = spec
    for a in aliases:
        _ALIASES[a] = name


def get_target(name: str | TargetSpec) -> TargetSpec:
    """Resolve a name or alias (a `TargetSpec` passes through unchanged)."""
    if isinstance(name, TargetSpec):
        return name
    if not isinstance(name, str):
        raise ConfigError(f"target must be a target name (str) such as 'arm' or a graphopt.TargetSpec, got "
                          f"{type(name).__name__}; `graphopt targets` lists the names")
    key = _ALIASES.get(name, name)
    if key not in _SPECS:
        known = ", ".join(sorted(list(_SPECS) + [f"{a} (= {t})" for a, t in _ALIASES.items()]))
        names = [*_SPECS, *_ALIASES]
        close = [n for n in names if n == name.strip().lower().replace("_", "-").replace(" ", "-")]
        close = close or difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
        hint = f"Did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise UnknownTargetError(f"unknown target {name!r}. {hint}Known targets: {known}. "
                                 "Run `graphopt targets` for details, or register your own with "
                                 "graphopt.targets.register_target(TargetSpec(...)).")
    spec = _SPECS[key]
    if not isinstance(spec, TargetSpec):
        spec = spec()
        _SPECS[key] = spec
    return spec


def list_targets() -> list[TargetSpec]:
    return [get_target(n) for n in sorted(_SPECS)]


def aliases_of(name: str) -> list[str]:
    return sorted(a for a, t in _ALIASES.items() if t == name)


def builtin_targets() -> list[tuple[TargetSpec | Callable[[], TargetSpec], dict]]:
    """The targets graphopt ships, as (spec or factory, `register_target` keywords): one line each."""
    return [(host.detect_host, {"name": "host", "aliases": ("x86",)}),  # probes this machine on first use
            *((spec, {}) for spec in cortex_a.SPECS), *((spec, {}) for spec in cortex_m.SPECS), (armv7.SPEC, {})]


for _spec, _options in builtin_targets():
    register_target(_spec, **_options)
