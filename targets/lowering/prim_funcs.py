"""The one loop every module-level TIR rewrite of the lowering shares: each PrimFunc of an IRModule through a
function, replaced only where that changed it. Refuses nothing; Relax functions are left as they are."""
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
