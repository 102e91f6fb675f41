"""aarch64's ``sqrdmulh`` for the requantize epilogue's fixed-point products.

The converters (`graphopt.targets.lowering.converters`) write gemmlowp's SaturatingRoundingDoublingHighMul
of int32 values as int64 arithmetic, on targets with `Feature.A64` in the form

    Cast(int32, (Cast(int64, a) · Cast(int64, b) + 2^30) ≫ 31)          a, b int32

which equals ``sqrdmulh(a, b)`` — ``(2ab + 2^31) ≫ 32``, the same floor — for every pair except
a = b = INT32_MIN (sqrdmulh saturates; graphopt's multipliers are < 2^31). LLVM selects it as two
widening multiplies, 64-bit adds and narrowing shifts per 4 lanes (~2.4 instructions per output on a
Cortex-A55 depthwise conv); `use_sqrdmulh` rewrites each such expression of a scheduled module into
the ``llvm.aarch64.neon.sqrdmulh`` intrinsic: one instruction per 4 lanes.

The intrinsic exists for i32, <2 x i32> and <4 x i32> only (LLVM cannot select it for wider
vectors), so vectorized loops computing it are split into unrolled runs of 4 (or 2) lanes, or run
scalar when their extent has neither factor. Refuses nothing: modules without the pattern are unchanged.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import sym, tirx
from tvm.target.codegen import llvm_lookup_intrinsic_id

from graphopt.targets.lowering.prim_funcs import map_prim_funcs
from graphopt.targets.spec import Feature, TargetSpec

INTRINSIC = "llvm.aarch64.neon.sqrdmulh"
_LANES = (4, 2)  # vector widths the intrinsic is selected for (int32 lanes)
_INT32 = (-(2 ** 31), 2 ** 31 - 1)
_CALL_LLVM = tvm.ir.Op.get("tirx.call_llvm_pure_intrin")


def has_sqrdmulh(spec: TargetSpec | None) -> bool:
    """Whether `spec` runs aarch64 NEON (its sqrdmulh is what `use_sqrdmulh` emits)."""
    return spec is not None and spec.has(Feature.A64) and spec.has(Feature.NEON)


def _int32_operand(e):
    """`e` as an int32 expression when it is ``Cast(int64, int32 value)`` or an int64 immediate within
    int32, else None."""
    if isinstance(e, tvm.ir.prim.expr.Cast) and str(e.ty) == "int64" and str(e.value.ty) == "int32":
        return e.value
    if isinstance(e, tvm.ir.prim.expr.IntImm) and _INT32[0] <= int(e.value) <= _INT32[1]:
        return tirx.const(int(e.value), "int32")
    return None


def _imm(e, value: int) -> bool:
    return isinstance(e, tvm.ir.prim.expr.IntImm) and int(e.value) == value


def _srdhm(cast):
    """``Cast(int32, (a·b + 2^30) ≫ 31)`` with int32 a, b as the sqrdmulh intrinsic, else `cast`."""
    if str(cast.ty) != "int32" or not isinstance(cast.value, tvm.ir.prim.expr.RShift):
        return cast
    shifted = cast.value
    if not _imm(shifted.b, 31) or not isinstance(shifted.a, tvm.ir.prim.expr.Add) or not _imm(shifted.a.b, 1 << 30):
        return cast
    product = shifted.a.a
    if not isinstance(product, tvm.ir.prim.expr.Mul) or str(product.ty) != "int64":
        return cast
    a, b = _int32_operand(product.a), _int32_operand(product.b)
    if a is None or b is None or (isinstance(a, tvm.ir.prim.expr.IntImm) and isinstance(b, tvm.ir.prim.expr.IntImm)):
        return cast
    shifted = _exact_shift(a, b)
    if shifted is None:
        shifted = _exact_shift(b, a)
    return tirx.call_llvm_pure_intrin("int32", INTRINSIC, a, b) if shifted is None else shifted


def _exact_shift(a, b):
    """SRDHM(x << s, 2^k) as ``x << (s + k − 31)`` when s + k ≥ 31 and x << s stays within int32 (x's bounds
    by `sym.Analyzer`): then (x·2^(s+k) + 2^30) ≫ 31 is exactly x·2^(s+k−31). A residual add's rescale of the
    operand at the output's scale reads this way (``(q − zp) << 20`` times 2^30): one shift per 4 lanes
    instead of a shift and a ``sqrdmulh``. None otherwise."""
    if not isinstance(b, tvm.ir.prim.expr.IntImm) or not isinstance(a, tvm.ir.prim.expr.LShift) \
            or not isinstance(a.b, tvm.ir.prim.expr.IntImm):
        return None
    m, s = int(b.value), int(a.b.value)
    k = m.bit_length() - 1
    if m <= 0 or m != 1 << k or not 0 <= s < 31 or s + k < 31:
        return None
    bound = sym.Analyzer().const_int_bound(a.a)
    if bound.min_value < _INT32[0] >> s or bound.max_value > _INT32[1] >> s:
        return None
    up = s + k - 31
    return a.a if up == 0 else a.a << tirx.const(up, "int32")


def is_srdhm(expr) -> bool:
    """Whether `expr` is a rounding doubling high multiply in the int64 form `use_sqrdmulh` rewrites."""
    return isinstance(expr, tvm.ir.prim.expr.Cast) and not _srdhm(expr).same_as(expr)


def _calls_intrinsic(stmt) -> bool:
    ident = llvm_lookup_intrinsic_id(INTRINSIC)
    found = []
    tvm_ffi.structural_walk(stmt, (tvm.ir.expr.Call, lambda c: found.append(
        c.op.same_as(_CALL_LLVM) and bool(c.args) and _imm(c.args[0], ident))))
    return any(found)


def _narrow_vector_loop(loop):
    """A vectorized loop whose body calls the intrinsic, as unrolled runs of `_LANES` lanes (or scalar)."""
    extent = loop.extent
    if loop.kind != tirx.ForKind.VECTORIZED or not isinstance(extent, tvm.ir.prim.expr.IntImm) \
            or int(extent) in _LANES or not _calls_intrinsic(loop.body):
        return loop
    lanes = next((n for n in _LANES if int(extent) % n == 0), None)
    if lanes is None:
        return tirx.For(loop.loop_var, loop.min, extent, tirx.ForKind.SERIAL, loop.body, None, loop.annotations)
    dtype = str(loop.loop_var.ty)
    outer, inner = tirx.Var(f"{loop.loop_var.name}_o", dtype), tirx.Var(f"{loop.loop_var.name}_v", dtype)
    index = loop.min + outer * tirx.const(lanes, dtype) + inner
    body = tvm_ffi.structural_map(loop.body, (tvm.ir.Var, lambda v: index if v.same_as(loop.loop_var) else v))
    vector = tirx.For(inner, tirx.const(0, dtype), tirx.const(lanes, dtype), tirx.ForKind.VECTORIZED, body)
    return tirx.For(outer, tirx.const(0, dtype), tirx.const(int(extent) // lanes, dtype), tirx.ForKind.UNROLLED,
                    vector, None, loop.annotations)


def use_sqrdmulh(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with every rounding doubling high multiply written in int64 (module docstring) as aarch64's
    ``sqrdmulh``, and the vectorized loops computing one narrowed to widths it is selected for."""
    def rewrite(func):
        rewritten = tvm_ffi.structural_map(func, (tvm.ir.prim.expr.Cast, _srdhm))
        return func if rewritten.same_as(func) else tvm_ffi.structural_map(rewritten, (tirx.For, _narrow_vector_loop))

    return map_prim_funcs(mod, rewrite)[0]
