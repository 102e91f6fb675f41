"""Conditions uniform over a vector's lanes written so the vectorizer sees it (e.g. a channel concat).

TVM's ``concatenate`` along the channel axis reads ``if_then_else(16 <= c, b[c − 16], a[c])``; with
``c = 8·o + l`` over a vectorized lane loop ``l`` TVM's simplifier does not see that the condition is the
same for every lane, so the vectorizer scalarizes the whole select (an int8 8×8×(16+16) concat: 4.9k
instructions on arm-a55, a load and a store per byte). `uniform_lane_conditions` rewrites, in blocks
under a vectorized loop of extent L, every comparison of a block variable bound to ``L·o + l`` (``l`` the
lane, ``o`` anything) against a constant multiple of L

    C <= v,  v >= C   →   C <= floordiv(v, L)·L        v < C,  C > v   →   floordiv(v, L)·L < C

exact for every integer v when L divides C (both sides compare whole multiples of L); TVM's simplifier
then folds ``floordiv(8·o + l, 8)`` to ``o`` and the select becomes a branch between two vector copies.
Selects of 32-bit values are left as they are: LLVM already vectorizes those (the fp32 model's fused
clip + concat, 2,436 instructions on arm-a55, counted 2,500 rewritten). Refuses nothing: other
conditions (e.g. a pad's ``1 <= y < 33``, 33 not a multiple) are unchanged.
"""
from __future__ import annotations

import re

import tvm
import tvm_ffi
from tvm import s_tir, sym, tirx

from graphopt.targets.lowering.prim_funcs import map_prim_funcs

_expr = tvm.ir.prim.expr
_IF_THEN_ELSE = tvm.ir.Op.get("prim.if_then_else")


def _bits(dtype: str) -> int:
    """Bits of a scalar dtype such as ``int8`` or ``float32`` (a vector's lanes; 32 when unknown)."""
    digits = re.match(r"[a-z]+(\d+)", dtype)
    return int(digits.group(1)) if digits else 32


def _constant(e) -> int | None:
    return int(e.value) if isinstance(e, _expr.IntImm) else None


def _lane_vars(realize, lane, extent: int) -> set:
    """Block variables of `realize` bound to ``extent·o + lane`` (o free of `lane`)."""
    analyzer = sym.Analyzer()
    found = set()
    for iv, value in zip(realize.block.iter_vars, realize.iter_values, strict=True):
        coef = sym.detect_linear_equation(value, [lane])
        if len(coef) != 2 or _constant(analyzer.simplify(coef[0])) != 1:
            continue
        if analyzer.can_prove_equal(tirx.floormod(coef[1], extent), 0):
            found.add(iv.var)
    return found


def _rewrite_realize(realize, lane, extent: int):
    variables = _lane_vars(realize, lane, extent)
    if not variables:
        return realize

    def aligned(v):
        return tirx.floordiv(v, tirx.const(extent, v.ty)) * tirx.const(extent, v.ty)

    def lane_var(e):
        return next((v for v in variables if isinstance(e, tvm.ir.Var) and v.same_as(e)), None)

    def compare(node):
        a, b = node.a, node.b
        if isinstance(node, (_expr.LE, _expr.GT)) and lane_var(b) is not None:  # C <= v, C > v
            c = _constant(a)
            if c is not None and c % extent == 0:
                return type(node)(a, aligned(b))
        if isinstance(node, (_expr.LT, _expr.GE)) and lane_var(a) is not None:  # v < C, v >= C
            c = _constant(b)
            if c is not None and c % extent == 0:
                return type(node)(aligned(a), b)
        return node

    def select(call):
        if not call.op.same_as(_IF_THEN_ELSE) or _bits(str(call.ty)) >= 32:
            return call
        cond = tvm_ffi.structural_map(call.args[0], [((_expr.LE, _expr.LT, _expr.GE, _expr.GT), compare)])
        if cond.same_as(call.args[0]):
            return call
        return tirx.if_then_else(cond, call.args[1], call.args[2])

    return tvm_ffi.structural_map(realize, (tvm.ir.Call, select))


def _rewrite_loop(loop):
    extent = _constant(loop.extent)
    if loop.kind != tirx.ForKind.VECTORIZED or extent is None or extent < 2:
        return loop
    body = tvm_ffi.structural_map(loop.body, (s_tir.SBlockRealize,
                                              lambda r: _rewrite_realize(r, loop.loop_var, extent)))
    if body.same_as(loop.body):
        return loop
    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding, loop.annotations)


def uniform_lane_conditions(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with lane-uniform comparisons in vectorized blocks written as such (module docstring)."""
    return map_prim_funcs(mod, lambda func: tvm_ffi.structural_map(func, (tirx.For, _rewrite_loop)))[0]
