"""Applying a tuning database during lowering: the ``schedule`` phase's first step.

`applying(database)` makes a MetaSchedule database active for the lowerings inside it (compile's
``database=``); `apply_database(mod, spec, database)` runs `MetaScheduleApplyDatabase` on a COPY of
the fused module and names the kernels it scheduled and those whose default schedule the database
kept (no record measured faster); the default rules schedule the rest.
`is_scheduled` says whether a PrimFunc already carries a schedule. The records come from
`graphopt.targets.tuning`, which this module never imports.
"""
from __future__ import annotations

import contextlib
import contextvars

from graphopt.targets.lowering.kernels import prepare_tvm
from graphopt.targets.spec import TargetSpec

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("graphopt_tuning_database", default=None)


@contextlib.contextmanager
def applying(database):
    """While active, lowering's ``schedule`` phase applies `database` before the default rules."""
    token = _ACTIVE.set(database)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_database():
    return _ACTIVE.get()


def apply_database(mod, spec: TargetSpec, database) -> tuple:
    """(module, names of PrimFuncs scheduled from `database`, kernels whose default schedule the
    database keeps because no record beat it: ``{kernel, tuned_s, default_s}``). Works on a copy of `mod`."""
    import tvm
    from tvm import relax

    prepare_tvm(spec)
    before = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    kept = getattr(database, "kept_default", None)
    if kept is not None:
        kept.clear()
    with spec.tvm(), database:
        out = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod.clone())
    applied = sorted(gv.name_hint for gv, f in out.functions_items()
                     if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint in before
                     and not before[gv.name_hint].same_as(f) and is_scheduled(f))
    return out, applied, sorted(kept or [], key=lambda k: k["kernel"])


def is_scheduled(func) -> bool:
    attrs = func.attrs
    return attrs is not None and any(k in attrs and bool(attrs[k]) for k in ("tirx.is_scheduled", "tir.is_scheduled"))
