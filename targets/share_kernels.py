"""Kernels shared between layers of equal shape, for the runtime-free C library (flash is code too).

After scheduling, TVM keeps one PrimFunc per fused layer. Layers of equal shapes and schedules
differ only in their weights (arguments already) and in immediates inside the computed values:
zero points, clamp bounds, per-tensor multipliers and shifts. `share_kernels` masks those
immediates (integer and float constants in the value of every buffer store, outside loads'
indices, lane counts and the operands of calls other than selects, shifts and bitwise ops) and
groups PrimFuncs whose masked forms are structurally equal. A group becomes one PrimFunc:
identical members are merged outright; where members' immediates differ, the shared kernel reads
them from an extra int32 tensor (one small constant per call, with the weights) and every call
passes its own. Declined, and kept per layer (listed in the stats): groups whose differing
immediates are not integers that fit int32.
"""
from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx

# calls whose operands may become run-time values (others, e.g. LLVM intrinsics whose first operand is an
# intrinsic id, keep their immediates: a difference there keeps the kernels apart)
_OPEN_CALLS = {"tirx.if_then_else", "tirx.likely", "tirx.shift_left", "tirx.shift_right", "tirx.bitwise_and",
               "tirx.bitwise_or", "tirx.bitwise_xor", "tirx.bitwise_not"}
_INT32 = (-(1 << 31), (1 << 31) - 1)
_SIGNED = {f"int{b}": (1 << (b - 1)) - 1 for b in (8, 16, 32, 64)}  # largest value per signed type


def _rewrite_values(func, replace):
    """`func` with every immediate in a stored value replaced by ``replace(imm, position)`` (positions
    count immediates in traversal order, which is the same for structurally equal functions)."""
    position = [0]

    def imm(node, _m):
        new = replace(node, position[0])
        position[0] += 1
        return new

    def broadcast(node, m):  # lanes stay constant
        return tvm.ir.prim.expr.Broadcast(m.mutate(node.value), node.lanes)

    def call(node, m):
        return m.default_mutate(node) if getattr(node.op, "name", "") in _OPEN_CALLS else node

    def sub(node, m):  # x - c is x + (-c): TVM's simplifier writes a negative zero point as a subtraction
        c = node.b
        if isinstance(c, tvm.ir.prim.expr.IntImm) and str(c.ty) in _SIGNED and -c.value <= _SIGNED[str(c.ty)]:
            return tvm.ir.prim.expr.Add(m.mutate(node.a), m.mutate(tvm.ir.prim.expr.IntImm(str(c.ty), -c.value)))
        return m.default_mutate(node)

    value_rules = [(tvm.ir.expr.TensorLoad, lambda n, _m: n), (tvm.ir.prim.expr.Ramp, lambda n, _m: n),
                   (tvm.ir.prim.expr.Shuffle, lambda n, _m: n), (tvm.ir.prim.expr.Broadcast, broadcast),
                   (tvm.ir.expr.Call, call), (tvm.ir.prim.expr.Sub, sub),
                   ((tvm.ir.prim.expr.IntImm, tvm.ir.prim.expr.FloatImm), imm)]

    def store(node, _m):
        return tirx.BufferStore(node.buffer, tvm_ffi.structural_mutate(node.value, value_rules), node.indices)

    return tvm_ffi.structural_mutate(func, [(tirx.BufferStore, store)])


def _masked(func) -> tuple[object, list]:
    """(func with stored immediates masked to 0, the immediates as (dtype, value) in order)."""
    found = []

    def mask(node, _pos):
        dtype = str(node.ty)
        found.append((dtype, node.value))
        return (tvm.ir.prim.expr.FloatImm(dtype, 0.0) if isinstance(node, tvm.ir.prim.expr.FloatImm)
                else tvm.ir.prim.expr.IntImm(dtype, 0))

    return _rewrite_values(func, mask), found


def _lifted(func, positions: list[int], inputs: int):
    """`func` reading the immediates at `positions` from a new int32 parameter placed after its
    first `inputs` parameters (the call's inputs; outputs follow)."""
    imm = tirx.decl_buffer([len(positions)], "int32", name="shared_imm")
    slot = {p: i for i, p in enumerate(positions)}

    def read(node, pos):
        if pos not in slot:
            return node
        load = tirx.BufferLoad(imm, [tvm.ir.prim.expr.IntImm("int64", slot[pos])])
        return load if str(node.ty) == "int32" else tvm.ir.prim.expr.Cast(str(node.ty), load)

    body = _rewrite_values(func, read).body
    params = [*func.params[:inputs], imm, *func.params[inputs:]]
    return tirx.PrimFunc(params, body, func.ret_type, func.attrs)


def _call_sites(main) -> dict:
    """{kernel GlobalVar name: number of input arguments} of ``call_tir`` bindings in `main`."""
    call_tir, sites = tvm.ir.Op.get("relax.call_tir"), {}
    for block in main.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op.same_as(call_tir):
                sites[v.args[0].name_hint] = len(v.args[1].fields)
    return sites


def share_kernels(mod) -> tuple[object, dict]:
    """`mod` with equal-shape kernels shared (see the module docstring), and stats: kernels before and
    after, the shared groups and the declined ones."""
    sites = _call_sites(mod["main"])
    funcs = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and gv.name_hint in sites]
    groups: list[list] = []  # [(gv, func, masked, immediates)]
    for gv, f in funcs:
        masked, imms = _masked(f)
        group = next((g for g in groups if tvm_ffi.structural_equal(g[0][2], masked)), None)
        if group is None:
            groups.append(group := [])
        group.append((gv, f, masked, imms))
    mapping, stats = {}, {"kernels_before": len(funcs), "shared": [], "declined": []}
    for group in groups:
        if len(group) < 2:
            continue
        first_gv, first, _, imms = group[0]
        diff = [i for i in range(len(imms)) if len({g[3][i][1] for g in group}) > 1]
        bad = [imms[i][0] for i in diff if not imms[i][0].startswith(("int", "uint"))
               or not all(_INT32[0] <= g[3][i][1] <= _INT32[1] for g in group)]
        names = [g[0].name_hint for g in group]
        if bad:
            stats["declined"].append({"kernels": names, "reason": f"differing immediates of type {sorted(set(bad))}"})
            continue
        shared_gv = first_gv
        if diff:  # a new signature needs a new GlobalVar (Relax types calls by it)
            bb = relax.BlockBuilder(mod)
            shared_gv = bb.add_func(_lifted(first, diff, sites[first_gv.name_hint]), f"{first_gv.name_hint}_shared")
            mod = bb.get()
        for gv, _, _, values in group:
            mapping[gv.name_hint] = (shared_gv, [values[i][1] for i in diff])
        stats["shared"].append({"kernel": shared_gv.name_hint, "layers": len(group), "immediates": len(diff)})
    if mapping:
        mod = _redirect_calls(mod, mapping)
    stats["kernels_after"] = stats["kernels_before"] - sum(s["layers"] - 1 for s in stats["shared"])
    return mod, stats


def _redirect_calls(mod, mapping: dict):
    """Point every ``call_tir`` of a grouped kernel at its group's kernel, with its immediates appended."""
    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.mutator
    class _Redirect(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(call_tir) or call.args[0].name_hint not in mapping:
                return call
            gv, values = mapping[call.args[0].name_hint]
            args = list(call.args[1].fields)
            if values:
                args.append(relax.const(np.asarray(values, dtype=np.int32), "int32"))
            return relax.Call(call.op, [gv, relax.Tuple(args), *call.args[2:]], call.attrs, call.ty_args)

    mod = mod.clone()
    mod["main"] = _Redirect(mod).visit_expr(mod["main"])
    return relax.transform.DeadCodeElimination()(mod)
