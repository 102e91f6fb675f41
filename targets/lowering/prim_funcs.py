"""TIR helpers the lowering shares: the one loop every module-level TIR rewrite runs (each PrimFunc of an
IRModule through a function, replaced only where that changed it; Relax functions are left as they are), static
shapes as ints (`single_call`, the C library's emitter), and the byte-run expressions of the kernels written by
hand in TVMScript (`patches`, `pad_rows`)."""
from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import tirx


def map_prim_funcs(mod: tvm.IRModule, rewrite: Callable[[tirx.PrimFunc], tirx.PrimFunc]) -> tuple[tvm.IRModule, int]:
    """A copy of `mod` with each PrimFunc replaced by ``rewrite(func)`` where that is not the same object,
    and how many were replaced."""
    mod = mod.clone()
    changed = 0
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc):
            rewritten = rewrite(func)
            if not rewritten.same_as(func):
                mod[gv] = rewritten
                changed += 1
    return mod, changed


def static_dims(shape) -> tuple[int, ...] | None:
    """A Relax ``ShapeExpr``'s or a TIR shape's dimensions as ints, None when one is symbolic."""
    dims = list(shape.values) if hasattr(shape, "values") else list(shape)
    if not all(isinstance(d, int | tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def span(start, width: int):
    """The index of `width` contiguous elements from `start`: a ramp, or `start` itself for one (a ramp
    needs 2 lanes)."""
    return tirx.Ramp(start, 1, width) if width > 1 else start


def splat(value: int, width: int, dtype: str = "int8"):
    """`value` in `width` lanes (a scalar for one), to store to a `span`."""
    scalar = tirx.const(value, dtype)
    return tirx.Broadcast(scalar, width) if width > 1 else scalar
