"""The requantize epilogue's int32 → int8 narrowing in 8- and 16-bit lanes on aarch64 NEON.

A requantize ends (`converters._saturate_int8`) in ``Cast(int8, clamp(y + zp, lo, hi))`` with y int32 and
the output zero point zp and the activation bounds ``-128 ≤ lo ≤ hi ≤ 127`` immediates. LLVM computes
that at int32, 4 lanes per instruction: an add, a max and a min per 4 outputs before the narrowing
(~11 instructions per 16 outputs on a Cortex-A55). `narrow_through_int16` rewrites it, inside vectorized
loops, as

    Cast(int8, sat8(sadd_sat16(sat16(y), zp)))  then  max(·, lo) / min(·, hi) in int8 where not ±128/127

which LLVM selects as saturating narrowings (``sqxtn``/``sqxtn2``: 4 per 16 outputs to int16, 2 to int8),
the zero point as one saturating int16 add (``sqadd``) per 8 outputs, and a clamp (when there is one) of
16 int8 lanes per instruction: ~8–10 instructions per 16 outputs.

Exact for every int32 y and |zp| < 2^15 − 2^8: where sat16 changes y (|y| ≥ 2^15) or the add saturates,
the result stays beyond ±2^15 − 2^8 with y + zp's sign, so both forms clamp to the same bound.
Refuses nothing: narrowings of other forms, those not stored (an int8 value widened again: the int32
clamp is cheaper) and those outside vectorized loops (scalar code would pay for the int16 steps) are unchanged.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

from graphopt.targets.lowering.prim_funcs import map_prim_funcs

_INT8 = (-128, 127)
_INT16 = (-(2 ** 15), 2 ** 15 - 1)
_ZERO_POINT = 2 ** 15 - 2 ** 8  # |zp| below: saturating at int16 cannot move a result across an int8 bound
_SADD_SAT = "llvm.sadd.sat"
_expr = tvm.ir.prim.expr


def _imm(e) -> int | None:
    return int(e.value) if isinstance(e, _expr.IntImm) else None


def _clamp(e):
    """(x, lo, hi) when `e` is ``min(max(x, lo), hi)`` or ``max(min(x, hi), lo)`` with immediate bounds."""
    if isinstance(e, _expr.Min) and isinstance(e.a, _expr.Max):
        return e.a.a, _imm(e.a.b), _imm(e.b)
    if isinstance(e, _expr.Max) and isinstance(e.a, _expr.Min):
        return e.a.a, _imm(e.b), _imm(e.a.b)
    return None


def _int8_bounds(lo: int | None, hi: int | None) -> bool:
    return lo is not None and hi is not None and _INT8[0] <= lo <= hi <= _INT8[1]


def _offset(e):
    """(y, c) for ``y + c`` or ``y − c`` with an immediate c, else (e, 0)."""
    if isinstance(e, _expr.Add) and _imm(e.b) is not None:
        return e.a, _imm(e.b)
    if isinstance(e, _expr.Sub) and _imm(e.b) is not None:
        return e.a, -_imm(e.b)
    return e, 0


def _narrow(cast):
    """``Cast(int8, clamp(y + zp, lo, hi))`` with int32 y in the int16 form (module docstring), else `cast`."""
    if str(cast.ty) != "int8" or str(cast.value.ty) != "int32":
        return cast
    clamped = _clamp(cast.value)
    if clamped is None:
        return cast
    inner, lo, hi = clamped
    if not _int8_bounds(lo, hi):
        return cast
    y, zp = _offset(inner)
    if abs(zp) >= _ZERO_POINT:
        return cast
    wide = tirx.Cast("int16", tirx.Min(tirx.Max(y, tirx.const(_INT16[0], "int32")),
                                       tirx.const(_INT16[1], "int32")))
    if zp:
        wide = tirx.call_llvm_pure_intrin("int16", _SADD_SAT, wide, tirx.const(zp, "int16"))
    out = tirx.Cast("int8", tirx.Min(tirx.Max(wide, tirx.const(_INT8[0], "int16")), tirx.const(_INT8[1], "int16")))
    if lo > _INT8[0]:
        out = tirx.Max(out, tirx.const(lo, "int8"))
    if hi < _INT8[1]:
        out = tirx.Min(out, tirx.const(hi, "int8"))
    return out


def _unwiden(cast):
    """``Cast(int32, Cast(int8, clamp(y, lo, hi)))`` with int32 y and int8 bounds as ``clamp(y, lo, hi)``: the
    narrowing changes nothing, but LLVM keeps it (a shift pair per 4 lanes to sign-extend), else `cast`."""
    inner = cast.value
    if str(cast.ty) != "int32" or not isinstance(inner, _expr.Cast) or str(inner.ty) != "int8" \
            or str(inner.value.ty) != "int32":
        return cast
    clamped = _clamp(inner.value)
    if clamped is None or not _int8_bounds(*clamped[1:]):
        return cast
    return inner.value


def _narrow_store(store):
    """`store` with its value in the int16 form when it is a clamp-and-narrow (not a narrowing widened
    again, e.g. an int8 result a fused residual add rescales: there the int32 clamp is cheaper)."""
    if not isinstance(store.value, _expr.Cast):
        return store
    value = _narrow(store.value)
    if value.same_as(store.value):
        return store
    return tirx.BufferStore(store.buffer, value, store.indices)


def _narrow_vector_loop(loop):
    if loop.kind != tirx.ForKind.VECTORIZED:
        return loop
    body = tvm_ffi.structural_map(loop.body, [(_expr.Cast, _unwiden), (tirx.BufferStore, _narrow_store)])
    if body.same_as(loop.body):
        return loop
    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding, loop.annotations)


def narrow_through_int16(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with every stored int32 → int8 clamp-and-narrow inside a vectorized loop in the int16 form."""
    return map_prim_funcs(mod, lambda func: tvm_ffi.structural_map(func, (tirx.For, _narrow_vector_loop)))[0]
