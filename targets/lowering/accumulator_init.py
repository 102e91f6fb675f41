"""Per-channel additive terms of an int8 kernel's epilogue (bias, zero-point offset, correction) folded into
its accumulator's initial value.

An integer conv/dense of graphopt's own kernels (the blocks annotated `dot.DOT_ATTR`, `int8.DEPTHWISE_ATTR`,
`int8.DEPTHWISE_DSP_ATTR`, `int8.GROUPED_ATTR`) starts its int32 accumulators at 0, and the fused epilogue then
adds the per-channel offset (`converters._add_offset`: bias − zx·Σw) to each: one vector add per 4 outputs.
Started at the offset instead, the kernel initialises each accumulator with a copy of a per-channel vector in place of a
zeroed register and the add is gone (~0.25 instructions per output on aarch64). Bit-exact: int32 sums
wrap the same in any order.

`fold_into_init` follows, from such a reduction, the chain of blocks that each read only the previous
one's buffer elementwise (same shape, the same index) and are its only reader: a block computing
``prev + t`` or ``prev − t``, where t reads only the PrimFunc's inputs at indices of the element, moves t
into the initial value and becomes a copy (inlined by every schedule); a plain copy is passed through.
The reduction block's declared reads stay as they were (tensorization matches them against its
intrinsic's; the moved terms read only inputs, so no dependency is hidden). Refuses nothing: a reduction
with other readers, a padded or re-laid-out accumulator (channel padding, the
2-pixel ``smmla`` blocks), a non-zero or non-int32 initial value, or terms reading intermediate buffers
stop the chain where they are found, leaving the rest as it was.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from graphopt.targets.lowering.dot import DOT_ATTR
from graphopt.targets.lowering.int8 import DEPTHWISE_ATTR, DEPTHWISE_DSP_ATTR, GROUPED_ATTR
from graphopt.targets.lowering.prim_funcs import map_prim_funcs

_ATTRS = (DOT_ATTR, DEPTHWISE_ATTR, DEPTHWISE_DSP_ATTR, GROUPED_ATTR)
_expr = tvm.ir.prim.expr


def _blocks(func) -> list:
    found: list = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, found.append))
    return found


def _loaded(expr) -> list:
    """The buffers `expr` loads from."""
    found = []
    tvm_ffi.structural_walk(expr, (tvm.ir.TensorLoad, lambda load: found.append(load.source)))
    return found


def _is_zero_init(block) -> bool:
    init = block.init
    return isinstance(init, tirx.BufferStore) and str(init.buffer.dtype) == "int32" \
        and isinstance(init.value, _expr.IntImm) and int(init.value) == 0


def _split(value, source):
    """(load of `source`, term, sign) when `value` is ``load ± term`` or ``term + load``; (load, None, 1) for
    a plain copy; else None."""
    def is_load(e):
        return isinstance(e, tvm.ir.TensorLoad) and e.source.same_as(source)

    if is_load(value):
        return value, None, 1
    if isinstance(value, _expr.Add):
        if is_load(value.a):
            return value.a, value.b, 1
        if is_load(value.b):
            return value.b, value.a, 1
    if isinstance(value, _expr.Sub) and is_load(value.a):
        return value.a, value.b, -1
    return None


def _substitute(node, pairs: list):
    """`node` with each variable of (variable, value) `pairs` replaced by its value."""
    return tvm_ffi.structural_map(node, (tvm.ir.Var, lambda v: next((w for i, w in pairs if i.same_as(v)), v)))


def _fold(func):
    blocks = _blocks(func)
    main = next((b for b in blocks if any(a in b.annotations for a in _ATTRS) and _is_zero_init(b)), None)
    if main is None:
        return func
    written = [w.source for b in blocks for w in b.writes]
    init = main.init
    shape = [int(d) for d in init.buffer.shape] if all(isinstance(d, _expr.IntImm) for d in init.buffer.shape) else None
    source, start, edits = init.buffer, None, []  # (block, its load of the previous buffer, buffers moved out)
    while shape is not None:
        readers = [b for b in blocks if any(r.source.same_as(source) for r in b.reads)]
        if len(readers) != 1 or readers[0].init is not None or not isinstance(readers[0].body, tirx.BufferStore):
            break
        block = readers[0]
        store = block.body
        split = _split(store.value, source)
        if split is None or [int(d) if isinstance(d, _expr.IntImm) else None for d in store.buffer.shape] != shape:
            break
        load, term, sign = split
        indices = list(load.indices)
        if not all(isinstance(i, tvm.ir.Var) for i in indices) \
                or not tvm_ffi.structural_equal(indices, list(store.indices)):
            break
        if term is not None:
            if str(term.ty) != "int32" or any(b.same_as(w) for b in _loaded(term) for w in written):
                break
            free = []  # the index variables of the term (its buffers are variables too)
            tvm_ffi.structural_walk(term, (tvm.ir.Var, free.append))
            if not all(any(v.same_as(i) for i in indices) or any(v.same_as(b) for b in _loaded(term)) for v in free):
                break
            moved = _substitute(term, list(zip(indices, init.indices, strict=True)))
            moved = moved if sign > 0 else tirx.const(0, "int32") - moved
            start = moved if start is None else start + moved
            edits.append((block, load, _loaded(term)))
        source = store.buffer
    if start is None:
        return func

    def rewrite(block):
        if block.same_as(main):
            return s_tir.SBlock(list(block.iter_vars), list(block.reads), list(block.writes),
                                block.name_hint, block.body, tirx.BufferStore(init.buffer, start, init.indices),
                                list(block.alloc_buffers), list(block.match_buffers), dict(block.annotations))
        edit = next((e for e in edits if e[0].same_as(block)), None)
        if edit is not None:
            _, load, moved = edit
            kept = [r for r in block.reads if not any(r.source.same_as(b) for b in moved)]
            return s_tir.SBlock(list(block.iter_vars), kept, list(block.writes), block.name_hint,
                                tirx.BufferStore(block.body.buffer, load, block.body.indices), None,
                                list(block.alloc_buffers), list(block.match_buffers), dict(block.annotations))
        return block

    return tvm_ffi.structural_map(func, (s_tir.SBlock, rewrite))


def fold_into_init(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with the epilogue's additive terms of each int8 kernel not yet scheduled moved into its
    accumulator's initial value (module docstring)."""
    return map_prim_funcs(mod, lambda func: func if func.attrs is not None and "tirx.is_scheduled" in func.attrs
                          else _fold(func))[0]
