"""One kernel call per inference: the Relax main's kernel calls written into a single PrimFunc (a few, in
sequence, for long models).

The Relax VM spends ~1.2k instructions per kernel call even in compiled mode (arm-a55, a chain of 8×8
matmuls): it allocates a storage and a tensor object for every intermediate, releases them, and packs the
call's arguments — on the zoo's small models 2–6 % of an inference, a fifth of the tiny transformer's.
`merge_calls` writes main's kernels, in order, into one PrimFunc ``graph`` that main calls once: the model's
inputs, the constants and the outputs are its parameters, every intermediate a buffer of its own. Above
`MAX_CALLS` kernel calls the kernels go into several such functions ``graph0``, ``graph1``… in sequence, each
returning what later ones or main's outputs read. Each kernel
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
# Kernel calls per merged function: LLVM's time on one function grows faster than its size (fuzz bundles, host,
# merged against unmerged: 34 calls 3.0 vs 3.3 s, 75 calls 8.2 vs 8.1 s, 160 calls 23 vs 17 s), so longer
# models get several merged functions in sequence, the tensors between them allocated by the VM (160 calls in
# 4 functions: 17 s). The zoo's CNNs stay at one (≤ 26 calls); the transformers and MobileNetV2 take two.
MAX_CALLS = 48
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
    """`mod` with main calling the merged PrimFuncs (one, or `_groups` of them in sequence), and ``{"calls",
    "functions", "intermediate_bytes"}``; or `mod` unchanged and ``{"declined": reason}``."""
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
    for _, _, args in calls:
        for a in args:
            if a not in produced and (not isinstance(a, relax.Var | tvm.ir.Constant | tvm.ir.GenericConst)
                                      or _static_shape(a.ty) is None):
                return mod, {"declined": f"a kernel argument of type {type(a).__name__} without a static shape"}

    main = mod["main"]
    builder = relax.BlockBuilder()
    new_params = [relax.Var(p.name, p.ty) for p in main.params]
    values = dict(zip(main.params, new_params, strict=True))  # main's vars and the kernels' results → new main
    attrs = {k: main.attrs[k] for k in main.attrs.keys()} if main.attrs is not None else None
    groups = _groups(len(calls))
    total = 0
    with builder.function("main", new_params, attrs=attrs):
        with builder.dataflow():
            for i, group in enumerate(groups):
                later = {a for _, _, args in calls[group.stop:] for a in args} | set(outputs)
                own = {var for var, _, _ in calls[group]}
                external = _unique(a for _, _, args in calls[group] for a in args if a not in own)
                results = [var for var, _, _ in calls[group] if var in later] or [calls[group][-1][0]]
                graph, size = _merged(calls[group], funcs[group], external, results)
                total += size
                gvar = builder.add_func(graph, NAME if len(groups) == 1 else f"{NAME}{i}")
                out_ty = [r.ty for r in results]
                result = builder.emit(relax.call_tir(gvar, relax.Tuple([values.get(e, e) for e in external]),
                                                     out_ty if len(results) > 1 else out_ty[0]))
                for j, r in enumerate(results):
                    values[r] = builder.emit(relax.TupleGetItem(result, j)) if len(results) > 1 else result
            gv = builder.emit_output(relax.Tuple([values[o] for o in outputs]))
        builder.emit_func_output(gv)
    merged = builder.get()
    if mod.attrs is not None:
        merged = merged.with_attrs(mod.attrs)
    return merged, {"calls": len(calls), "functions": len(groups), "intermediate_bytes": total}


def _groups(n: int) -> list[slice]:
    """`n` calls in consecutive groups of at most `MAX_CALLS`, as even as can be."""
    count = -(-n // MAX_CALLS)
    size = -(-n // count)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _unique(exprs) -> list:
    """`exprs` without repeats (by identity: constants are not hashable by value), in first-seen order."""
    seen: list = []
    for e in exprs:
        if not any(e.same_as(s) for s in seen):
            seen.append(e)
    return seen


def _merged(calls: list, funcs: list, external: list, results: list) -> tuple[tirx.PrimFunc, int]:
    """One PrimFunc running `calls` (kernels `funcs`) in order: `external` and `results` its parameters, the
    other results buffers of its own; and those buffers' bytes."""
    kept = set(results)
    intermediates = [var for var, _, _ in calls if var not in kept]

    def param(expr):
        shape = _static_shape(expr.ty)
        name = expr.name if isinstance(expr, relax.Var) else f"constant{len(params)}"
        return tirx.decl_buffer([tirx.IntImm("int64", d) for d in shape], expr.ty.dtype, name, data_alignment=ALIGN)

    params: dict = {}
    for e in [*external, *results]:
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
    return graph, sum(_bytes(var.ty) for var in intermediates)


def build_config(stats: dict) -> dict:
    """The PassContext configuration building a module `merge_calls` returned with `stats` needs."""
    return _NO_STORAGE_REWRITE if "calls" in stats else {}
