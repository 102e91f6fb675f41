"""One kernel call per inference: the Relax main's kernel calls written into a single PrimFunc.

The Relax VM spends ~1.2k instructions per kernel call even in compiled mode (arm-a55, a chain of 8×8
matmuls): it allocates a storage and a tensor object for every intermediate, releases them, and packs the
call's arguments — on the zoo's small models 2–9 % of an inference, 30 % of the tiny transformer's int8.
`merge_calls` writes main's kernels, in order, into one PrimFunc ``graph`` that main calls once: the model's
inputs, the constants and the outputs are its parameters, and every intermediate lives in one arena placed by
`memory_plan` at the peak-live bound (the C library's plan; 64-byte aligned offsets). Each kernel body is
copied unchanged with fresh variables (a kernel called twice is written twice), each of its parameters a view
over a pointer of its own — the graph parameter's data, or the arena's plus the tensor's offset (an element
offset would be lost where a kernel re-declares its buffer flat, as `patches` and `pad_rows` do). Schedules,
tuning records and per-kernel instruction counts (`LoweringResult.ir_module`, the module before the merge)
still see the separate kernels. TVM's StorageRewrite would reuse memory by the accesses it sees, which the
views hide from it: `build_config` turns it off for a merged module (kernel instruction counts unchanged).

Refuses — returns the module unchanged with the reason, which the report shows — a main that is not one
dataflow block of ``call_tir`` bindings returning a tuple of them, symbolic shapes or TIR arguments, strided
or sub-byte buffers, an output that is an input, a constant or returned twice, fewer than two calls, and
kernels above `MAX_WORK_PER_CALL` on average (compile time would grow for a negligible share of an inference).
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

from graphopt.targets.lowering import memory_plan
from graphopt.targets.lowering.small_kernels import estimated_work

NAME = "graph"  # the merged PrimFunc
ALIGN = 64  # bytes: TVM's kernels assume 64-byte aligned buffers; every arena offset is a multiple
# Merged only while the kernels average at most this much work per call (`small_kernels.estimated_work`, loop
# iterations reaching a store; ~3 instructions each on the zoo's models), where the VM's ~1.2k per call is
# above ~1 % of an inference. LLVM compiles the merged function slower than the kernels apart (tiny
# transformer on arm-a55: lower and build 4.2 → 4.9 s), which 1–30 % fewer instructions per inference pay
# for; ResNet-18 at 224×224 (host, 725k iterations per call) would take 4.9 → 7.6 s for ~0.05 %.
MAX_WORK_PER_CALL = 1 << 15
_NO_STORAGE_REWRITE = {"tirx.disable_storage_rewrite": True}


def _static_shape(ty) -> list[int] | None:
    """The dimensions of a Relax tensor type or a TIR buffer type, None when one is symbolic or unknown."""
    shape = getattr(ty, "shape", None)
    values = getattr(shape, "values", shape)  # Relax: a ShapeExpr; TIR: the dimensions
    if values is None or not all(isinstance(d, int | tvm.ir.prim.expr.IntImm) for d in values):
        return None
    return [int(d) for d in values]


def _calls(main) -> tuple[list, list] | str:
    """``([(var, callee, args)], outputs)`` of `main`, or why it is refused."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    body = main.body
    if len(body.blocks) != 1 or not isinstance(body.blocks[0], relax.DataflowBlock):
        return "main is not one dataflow block"
    calls, outputs = [], None
    for binding in body.blocks[0].bindings:
        value = binding.value
        if outputs is not None:
            return "bindings after the output tuple"
        if isinstance(value, relax.Call) and value.op.same_as(call_tir) and len(value.args) == 2 \
                and isinstance(value.args[1], relax.Tuple):
            calls.append((binding.var, value.args[0], list(value.args[1].fields)))
        elif isinstance(value, relax.Tuple) and binding.var.same_as(body.body):
            outputs = list(value.fields)
        else:
            return f"a binding other than a kernel call: {type(value).__name__}"
    if outputs is None:
        return "main does not return a tuple"
    if len(calls) < 2:
        return "fewer than two kernel calls"
    produced = {var for var, _, _ in calls}
    if not all(isinstance(o, relax.Var) and o in produced for o in outputs) or len(set(outputs)) < len(outputs):
        return "an output is not a kernel's result, or is returned twice"
    return calls, outputs


def _bytes(ty) -> int:
    size = tvm.DataType(str(ty.dtype)).bits // 8
    for d in _static_shape(ty) or []:
        size *= d
    return size


def _kernels(mod, calls) -> list | str:
    """The PrimFuncs `calls` call, or why one cannot be merged."""
    funcs = []
    for _, gv, args in calls:
        func = mod[gv]
        if not isinstance(func, tirx.PrimFunc) or len(func.params) != len(args) + 1:
            return f"{gv.name_hint} is not a destination-passing kernel of its arguments"
        for p in func.params:
            if len(p.ty.strides) or tvm.DataType(str(p.ty.dtype)).bits % 8 or _static_shape(p.ty) is None:
                return f"{gv.name_hint} has a strided, sub-byte or symbolic parameter"
        funcs.append(func)
    return funcs


def _main(main, graph: tirx.PrimFunc, external: list, outputs: list) -> tvm.IRModule:
    """A module of `graph` and a main calling it once on `external` for `outputs`."""
    builder = relax.BlockBuilder()
    gvar = builder.add_func(graph, NAME)
    params = [relax.Var(p.name, p.ty) for p in main.params]
    renamed = dict(zip(main.params, params, strict=True))
    attrs = {k: main.attrs[k] for k in main.attrs.keys()} if main.attrs is not None else None
    with builder.function("main", params, attrs=attrs):
        with builder.dataflow():
            out_ty = [o.ty for o in outputs]
            result = builder.emit(relax.call_tir(gvar, relax.Tuple([renamed.get(e, e) for e in external]),
                                                 out_ty if len(outputs) > 1 else out_ty[0]))
            items = [builder.emit(relax.TupleGetItem(result, i)) for i in range(len(outputs))] \
                if len(outputs) > 1 else [result]
            gv = builder.emit_output(relax.Tuple(items))
        builder.emit_func_output(gv)
    return builder.get()


def merge_calls(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict]:
    """`mod` with main calling one merged PrimFunc, and ``{"calls", "arena_bytes", "lower_bound"}``; or
    `mod` unchanged and ``{"declined": reason}``."""
    found = _calls(mod["main"])
    if isinstance(found, str):
        return mod, {"declined": found}
    calls, outputs = found
    funcs = _kernels(mod, calls)
    if isinstance(funcs, str):
        return mod, {"declined": funcs}
    per_call = sum(estimated_work(f) for f in funcs) // len(funcs)
    if per_call > MAX_WORK_PER_CALL:
        return mod, {"declined": f"{per_call} loop iterations per kernel call, above {MAX_WORK_PER_CALL} "
                                 "(compile time)"}
    first = {var: k for k, (var, _, _) in enumerate(calls)}
    last = dict(first)
    external: list = []  # inputs and constants, in first use order
    for k, (_, _, args) in enumerate(calls):
        for a in args:
            if a in first:
                last[a] = k
                continue
            if not isinstance(a, relax.Var | tvm.ir.Constant | tvm.ir.GenericConst) or _static_shape(a.ty) is None:
                return mod, {"declined": f"a kernel argument of type {type(a).__name__} without a static shape"}
            if not any(a.same_as(e) for e in external):
                external.append(a)
    kept = set(outputs)
    plan = memory_plan.plan([memory_plan.Block(var, k, last[var], -(-max(_bytes(var.ty), 1) // ALIGN) * ALIGN)
                             for var, k in first.items() if var not in kept], len(calls))

    params: dict = {}
    for e in [*external, *outputs]:
        name = e.name if isinstance(e, relax.Var) else f"constant{len(params)}"
        params.setdefault(e, tirx.decl_buffer([tirx.IntImm("int64", d) for d in _static_shape(e.ty) or []],
                                              e.ty.dtype, name, data_alignment=ALIGN))
    arena = tirx.decl_buffer([tirx.IntImm("int64", max(plan.arena_bytes, 1))], "uint8", "arena",
                             data_alignment=ALIGN)
    base = tirx.buffer_data(arena)
    stmts = []
    for (var, _, args), func in zip(calls, funcs, strict=True):
        func = s_tir.renew_defs(func)  # fresh variables: a kernel called twice is written twice
        views, decls = {}, []
        for value, p in zip([*args, var], func.params, strict=True):
            if value in params:
                data = tirx.buffer_data(params[value])
            else:
                data = tirx.Var(f"{p.name}_data", base.ty)
                decls.append(tirx.Bind(data, tirx.call_intrin(base.ty, "tirx.handle_add_byte_offset", base,
                                                              tirx.IntImm("int32", plan.offsets[value]))))
            views[p] = tirx.decl_buffer(list(p.ty.shape), p.ty.dtype, p.name, data=data, data_alignment=ALIGN)
            decls.append(tirx.DeclBuffer(views[p], data=data))
        body = tvm_ffi.structural_map(func.body, (tvm.ir.Var, lambda v, views=views: views.get(v, v)))
        stmts.append(tirx.SeqStmt([*decls, body]))
    root = s_tir.SBlock([], [], [], "root", tirx.SeqStmt(stmts), alloc_buffers=[arena] if plan.offsets else [])
    graph = tirx.PrimFunc(list(params.values()), s_tir.SBlockRealize([], True, root))
    for key, value in (("tirx.is_scheduled", True), ("tirx.noalias", True), ("s_tir", True)):
        graph = graph.with_attr(key, value)
    merged = _main(mod["main"], graph, external, outputs)
    if mod.attrs is not None:
        merged = merged.with_attrs(mod.attrs)
    return merged, {"calls": len(calls), "arena_bytes": plan.arena_bytes, "lower_bound": plan.lower_bound}


def build_config(stats: dict) -> dict:
    """The PassContext configuration building a module `merge_calls` returned with `stats` needs."""
    return _NO_STORAGE_REWRITE if "calls" in stats else {}
