"""One kernel call per inference: the Relax main's kernel calls written into a single PrimFunc.

The Relax VM spends ~1.2k instructions per kernel call even in compiled mode (arm-a55, a chain of 8×8
matmuls): it allocates a storage and a tensor object for every intermediate, releases them, and packs the
call's arguments — on the zoo's small models 2–6 % of an inference, a fifth of the tiny transformer's.
`merge_calls` writes main's kernels, in order, into one PrimFunc ``graph`` that main calls once: the model's
inputs, the constants and the outputs are its parameters, every intermediate a buffer of its own. Each kernel
body is copied unchanged with fresh variables (a kernel called twice is written twice), each of its parameters
a view of the tensor it was passed, so schedules, tuning records and per-kernel instruction counts
(`LoweringResult.ir_module`, the module before the merge) still see the separate kernels.

The intermediates are not packed into one arena: TVM gives LLVM each buffer's accesses as never aliasing
another's, which holds within a kernel but not across kernels whose tensors would share arena bytes (LLVM moved
a load above an earlier kernel's store: BERT-tiny off by 5e-3); views of one shared pointer are correct but
lose that knowledge inside the kernels (tiny transformer int8 arm-a55: 205k instructions against 194k). So the
intermediates all live for the call — the VM reused storage between them; the report gives their bytes.
TVM's StorageRewrite would reuse memory by the accesses it sees, which the views hide from it: `build_config`
turns it off for a merged module (kernel instruction counts unchanged with it off).

Refuses — returns the module unchanged with the reason, which the report shows — a main that is not one
dataflow block of ``call_tir`` bindings returning a tuple of them, symbolic shapes or TIR arguments, strided
or sub-byte buffers, an output that is an input, a constant or returned twice, fewer than two calls, and
kernels above `MAX_WORK_PER_CALL` on average (compile time would grow for a negligible share of an inference).
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

from graphopt.targets.lowering.prim_funcs import static_dims
from graphopt.targets.lowering.small_kernels import estimated_work

NAME = "graph"  # the merged PrimFunc
ALIGN = 64  # bytes: TVM's kernels assume 64-byte aligned buffers
# Merged only while the kernels average at most this much work per call (`small_kernels.estimated_work`, loop
# iterations reaching a store; ~3 instructions each on the zoo's models), where the VM's ~1.2k per call is
# above ~1 % of an inference. LLVM compiles the merged function slower than the kernels apart (tiny
# transformer on arm-a55: lower and build 4.2 → 4.9 s), which 2–21 % fewer instructions per inference pay
# for; ResNet-18 at 224×224 (host, 725k iterations per call) would take 4.9 → 7.6 s for ~0.05 %. Small
# models also keep the intermediates' bytes small.
MAX_WORK_PER_CALL = 1 << 15
_NO_STORAGE_REWRITE = {"tirx.disable_storage_rewrite": True}


def _static_shape(ty) -> tuple[int, ...] | None:
    """The dimensions of a Relax tensor type or a TIR buffer type, None when one is symbolic or unknown."""
    shape = getattr(ty, "shape", None)
    return None if shape is None else static_dims(shape)


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


def _view(param, data):
    """A buffer shaped as kernel parameter `param` over pointer `data`."""
    return tirx.decl_buffer(list(param.ty.shape), param.ty.dtype, param.name, data=data, data_alignment=ALIGN)


def _bytes(ty) -> int:
    size = tvm.DataType(str(ty.dtype)).bits // 8
    for d in _static_shape(ty) or ():
        size *= d
    return size


def merge_calls(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict]:
    """`mod` with main calling one merged PrimFunc, and ``{"calls", "intermediate_bytes"}``; or `mod`
    unchanged and ``{"declined": reason}``."""
    found = _calls(mod["main"])
    if isinstance(found, str):
        return mod, {"declined": found}
    calls, outputs = found
    funcs = []
    for _, gv, args in calls:
        func = mod[gv]
        if not isinstance(func, tirx.PrimFunc) or len(func.params) != len(args) + 1:
            return mod, {"declined": f"{gv.name_hint} is not a destination-passing kernel of its arguments"}
        for p in func.params:
            if len(p.ty.strides) or tvm.DataType(str(p.ty.dtype)).bits % 8 or _static_shape(p.ty) is None:
                return mod, {"declined": f"{gv.name_hint} has a strided, sub-byte or symbolic parameter"}
        funcs.append(func)
    per_call = sum(estimated_work(f) for f in funcs) // len(funcs)
    if per_call > MAX_WORK_PER_CALL:
        return mod, {"declined": f"{per_call} loop iterations per kernel call, above {MAX_WORK_PER_CALL} "
                                 "(compile time)"}

    produced = {var for var, _, _ in calls}
    external: list = []  # inputs and constants, in first use order
    for _, _, args in calls:
        for a in args:
            if a in produced:
                continue
            if not isinstance(a, relax.Var | tvm.ir.Constant | tvm.ir.GenericConst) or _static_shape(a.ty) is None:
                return mod, {"declined": f"a kernel argument of type {type(a).__name__} without a static shape"}
            if not any(a.same_as(e) for e in external):
                external.append(a)
    kept = set(outputs)
    intermediates = [var for var, _, _ in calls if var not in kept]
    total = sum(_bytes(var.ty) for var in intermediates)

    def param(expr):
        shape = _static_shape(expr.ty)
        name = expr.name if isinstance(expr, relax.Var) else f"constant{len(params)}"
        return tirx.decl_buffer([tirx.IntImm("int64", d) for d in shape], expr.ty.dtype, name, data_alignment=ALIGN)

    params: dict = {}
    for e in [*external, *outputs]:
        params.setdefault(e, param(e))
    buffers = {**params, **{var: param(var) for var in intermediates}}
    stmts = []
    for (var, _, args), func in zip(calls, funcs, strict=True):
        func = s_tir.renew_defs(func)  # fresh variables: a kernel called twice is written twice
        views, decls = {}, []
        for value, p in zip([*args, var], func.params, strict=True):
            data = tirx.buffer_data(buffers[value])
            views[p] = _view(p, data)
            decls.append(tirx.DeclBuffer(views[p], data=data))
        body = tvm_ffi.structural_map(func.body, (tvm.ir.Var, lambda v, views=views: views.get(v, v)))
        stmts.append(tirx.SeqStmt([*decls, body]))
    root = s_tir.SBlock([], [], [], "root", tirx.SeqStmt(stmts), alloc_buffers=[buffers[v] for v in intermediates])
    graph = tirx.PrimFunc(list(params.values()), s_tir.SBlockRealize([], True, root))
    for key, value in (("tirx.is_scheduled", True), ("tirx.noalias", True), ("s_tir", True)):
        graph = graph.with_attr(key, value)

    main = mod["main"]
    builder = relax.BlockBuilder()
    gvar = builder.add_func(graph, NAME)
    new_params = [relax.Var(p.name, p.ty) for p in main.params]
    renamed = dict(zip(main.params, new_params, strict=True))
    attrs = {k: main.attrs[k] for k in main.attrs.keys()} if main.attrs is not None else None
    with builder.function("main", new_params, attrs=attrs):
        with builder.dataflow():
            out_ty = [o.ty for o in outputs]
            result = builder.emit(relax.call_tir(gvar, relax.Tuple([renamed.get(e, e) for e in external]),
                                                 out_ty if len(outputs) > 1 else out_ty[0]))
            items = [builder.emit(relax.TupleGetItem(result, i)) for i in range(len(outputs))] \
                if len(outputs) > 1 else [result]
            gv = builder.emit_output(relax.Tuple(items))
        builder.emit_func_output(gv)
    merged = builder.get()
    if mod.attrs is not None:
        merged = merged.with_attrs(mod.attrs)
    return merged, {"calls": len(calls), "intermediate_bytes": total}


def build_config(stats: dict) -> dict:
    """The PassContext configuration building a module `merge_calls` returned with `stats` needs."""
    return _NO_STORAGE_REWRITE if "calls" in stats else {}
