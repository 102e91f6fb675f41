"""Runtime-free C emitter: a captured model as a self-contained C library (no TVM runtime, no malloc).

`emit_library(ep, spec, out_dir, name)` runs graphopt's Relax phases up to scheduling
(import → decompose → layout → legalize → fuse → schedule, with `lowering.phases.run_phases`),
then Relax's static memory planner (`StaticPlanBlockMemory`), builds every PrimFunc into one
LLVM object for the target (argument asserts skipped: the generated caller always passes the
right tensors) and writes, into `out_dir`, with ``P = graphopt_<name>`` (so several libraries
can live in one firmware):

- ``kernels.o``: the kernels, packed calling convention, symbols prefixed ``P_``; the runtime
  hooks they call through (``__TVMBackend*``) are renamed to ``P__TVMBackend*`` with objcopy and
  defined in P.c: no TVM runtime symbol is left to resolve.
- ``P.c`` / ``P.h``: ``P_run(inputs, outputs)`` walks one byte stream (per call: kernel index,
  then one location index per argument) over a table of 16-bit scaled offsets into the weights
  and one arena, planned by `memory_plan` to its peak-live lower bound where the placement
  heuristics reach it: every activation and every call's workspace (the kernel's exact LIFO
  ``TVMBackendAllocWorkspace`` peak) is one block, reused across layers. Kernels get
  DLTensors carrying only data pointer, device, NULL strides (compact) and zero byte offset:
  the build checks that no kernel uses shape, ndim or dtype (all static, their asserts are
  compiled out). The header ``#define``s ``GRAPHOPT_<NAME>_*`` I/O shapes, dtypes, byte sizes
  and arena sizes.
- ``P_weights.bin`` + ``P_weights.S``: the weights as one blob, ``.incbin``-ed into ``.rodata``
  (flash on a microcontroller), every tensor 64-byte aligned.
- ``CMakeLists.txt`` (``add_library(P ...)`` for ``add_subdirectory``) and ``P.mk`` (a Makefile
  fragment, variables ``GRAPHOPT_<NAME>_*``).

Refuses (`LoweringError`, listing every offender): dynamic shapes, Relax bindings other than
kernel calls over planned tensors (e.g. external library calls, runtime builtins), workspace
requests of unknown size, kernels reading tensor metadata the library does not pass, and
kernels calling runtime functions this library does not provide.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import ConfigError, LoweringError, Unsupported
from graphopt.targets.backends import memory_plan, toolchain
from graphopt.targets.lowering.phases import run_phase, run_phases
from graphopt.targets.lowering.prim_funcs import static_dims
from graphopt.targets.spec import TargetSpec

ALIGN = 64  # arena, workspace and weight alignment (TVM's kernels assume 64-byte aligned buffers)
# runtime hooks the LLVM kernels call through weak function pointers -> the P.c function
_HOOKS = {
    "__TVMBackendAllocWorkspace": "gm_ws_alloc",
    "__TVMBackendFreeWorkspace": "gm_ws_free",
    "__TVMBackendParallelLaunch": "gm_parallel_launch",
    "__TVMBackendParallelBarrier": "gm_parallel_barrier",
}
_CTYPES = {("float", 32): "float", ("float", 64): "double", ("int", 8): "int8_t", ("int", 16): "int16_t",
           ("int", 32): "int32_t", ("int", 64): "int64_t", ("uint", 8): "uint8_t", ("uint", 16): "uint16_t",
           ("uint", 32): "uint32_t", ("uint", 64): "uint64_t", ("float", 16): "uint16_t", ("uint", 1): "uint8_t"}
# DLTensor fields (tvm_struct_get kinds) the glue leaves zero: shape, ndim, dtype code/bits/lanes
_UNPASSED_FIELDS = {2: "shape", 4: "ndim", 5: "dtype code", 6: "dtype bits", 7: "dtype lanes"}
_FRAME_ALLOWANCE = 512  # per kernel frame: saved registers, spills, the parallel-lambda closure


@dataclass(frozen=True)
class IOTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class CLibrary:
    """What `emit_library` wrote, with its memory figures (bytes)."""

    folder: Path
    prefix: str  # graphopt_<name>: C symbols, GRAPHOPT_<NAME>_* macros, file names
    inputs: list[IOTensor]
    outputs: list[IOTensor]
    kernels: int
    calls: int
    arena_bytes: int  # activations and kernel workspaces, one planned block each
    arena_lower_bound: int  # the peak-live bound the arena is measured against (`memory_plan`)
    workspace_bytes: int  # the largest workspace one kernel call takes (inside the arena)
    weights_bytes: int
    stack_estimate_bytes: int
    libraries: list[str] = field(default_factory=list)  # -l libraries the kernels need (e.g. m)
    live_bytes: list[int] = field(default_factory=list)  # per kernel call: arena bytes live during it
    call_kernels: list[str] = field(default_factory=list)  # per kernel call: the kernel it runs
    call_weight_bytes: list[int] = field(default_factory=list)  # per kernel call: bytes of weights it reads
    call_storage: list[dict | None] = field(default_factory=list)  # per kernel call: its weight-storage decision
    stats: dict = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        p = self.prefix
        return [f"{p}.c", f"{p}.h", f"{p}_weights.S", f"{p}_weights.bin", "kernels.o", "CMakeLists.txt", f"{p}.mk"]


def _ctype(dtype: str) -> str:
    import tvm

    dt = tvm.runtime.DataType(dtype)
    return _CTYPES.get(({0: "int", 1: "uint", 2: "float"}.get(dt.type_code, ""), dt.bits), "uint8_t")


def _round(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# --------------------------------------------------------------------------- Relax: plan

def _relax_to_planned(ep, spec: TargetSpec, phases: dict, state: dict):
    import tvm
    from tvm import relax

    from graphopt.targets.lowering.share_kernels import share_kernels

    ir = run_phases(ep, spec, state, phases, until="schedule")
    ir, state["shared_kernels"] = run_phase("share kernels", lambda: share_kernels(ir), spec, phases)
    plan = tvm.transform.Sequential([relax.transform.ToNonDataflow(), relax.transform.RemovePurityChecking(),
                                     relax.transform.CallTIRRewrite(), relax.transform.StaticPlanBlockMemory()])
    return run_phase("plan memory", lambda: plan(ir), spec, phases)


@dataclass
class _Tensor:
    region: str
    offset: int  # byte offset in the arena / weights blob, or the input / output index
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return IOTensor("", self.shape, self.dtype).nbytes


@dataclass
class _Graph:
    tensors: list[_Tensor] = field(default_factory=list)
    calls: list[tuple[str, list[int]]] = field(default_factory=list)  # (kernel, tensor indices)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (output index, tensor index)
    weights: bytearray = field(default_factory=bytearray)
    arena_bytes: int = 0
    workspace_at: list[int | None] = field(default_factory=list)  # per call: its workspace block's arena offset
    inputs: list[IOTensor] = field(default_factory=list)
    outputs: list[IOTensor] = field(default_factory=list)


def _static_shape(shape, what: str) -> tuple[int, ...]:
    dims = static_dims(shape)
    if dims is None:
        raise LoweringError("the C library needs static shapes",
                            [Unsupported(f"{what} has shape {list(getattr(shape, 'values', shape))}", "memory plan",
                                         "compile with fixed-size example inputs (no dynamic dimensions)")])
    return dims


def _walk_main(mod) -> _Graph:
    """Turn the planned ``main`` into tensors, kernel calls and the weight blob."""
    import tvm
    from tvm import relax

    op = tvm.ir.Op.get
    alloc_storage, alloc_tensor = op("relax.memory.alloc_storage"), op("relax.memory.alloc_tensor")
    builtin_alloc = op("relax.builtin.alloc_tensor")
    g, fresh = _Graph(), {}
    env: dict = {}  # Relax var -> tensor index, or a tuple of them
    consts: list = []
    main = mod["main"]

    def add(region, offset, shape, dtype) -> int:
        g.tensors.append(_Tensor(region, offset, tuple(shape), str(dtype)))
        return len(g.tensors) - 1

    def const(c) -> int:
        for known, idx in consts:
            if known.same_as(c):
                return idx
        arr = np.ascontiguousarray(c.value.numpy())
        g.weights.extend(b"\0" * (_round(len(g.weights)) - len(g.weights)))
        idx = add("weights", len(g.weights), arr.shape, arr.dtype.name)
        g.weights.extend(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        consts.append((c, idx))
        return idx

    for i, p in enumerate(main.params):
        shape = _static_shape(p.ty.shape, f"input {p.name}")
        g.inputs.append(IOTensor(f"input{i}", shape, str(p.ty.dtype)))
        env[p] = add("input", i, shape, p.ty.dtype)

    def value_of(a):
        if isinstance(a, tvm.ir.expr.Constant):
            return const(a)
        if isinstance(a, relax.Var) and a in env:
            return env[a]
        raise LoweringError("the C library cannot pass this value to a kernel",
                            [Unsupported(f"{type(a).__name__}: {str(a)[:120]}", "Relax main",
                                         "only tensors (activations, weights, inputs) can be kernel arguments")])

    bad = []
    for block in main.body.blocks:
        for b in block.bindings:
            v, val = b.var, b.value
            if isinstance(val, relax.Call) and val.op.same_as(alloc_storage):
                _static_shape(val.args[0], "a planned buffer")  # Relax's storages: replaced by `memory_plan`
            elif isinstance(val, relax.Call) and val.op.same_as(alloc_tensor):
                shape = _static_shape(val.args[2], f"tensor {v.name}")
                env[v] = add("arena", -1, shape, val.args[3].value)
            elif isinstance(val, relax.Call) and val.op.same_as(builtin_alloc):
                # an unplanned tensor: a model output; it is written straight into the caller's buffer
                shape = _static_shape(val.args[0], f"tensor {v.name}")
                env[v] = fresh[v] = add("output", -1, shape, val.args[1].value)
            elif isinstance(val, relax.Call) and isinstance(val.op, tvm.ir.GlobalVar):
                g.calls.append((val.op.name_hint, [value_of(a) for a in val.args]))
            elif isinstance(val, relax.Var) and val in env:
                env[v] = env[val]
            elif isinstance(val, relax.Tuple):
                env[v] = tuple(val.fields)
            elif isinstance(val, relax.TupleGetItem) and isinstance(env.get(val.tuple_value), tuple):
                env[v] = value_of(env[val.tuple_value][val.index])
            else:
                bad.append(Unsupported(f"{str(val)[:160]}", f"Relax binding {v.name}",
                                       "the op may need a TIR legalization; runtime builtins and external "
                                       "libraries are not available without the TVM runtime"))
    if bad:
        raise LoweringError("the model contains operations the runtime-free C library cannot run:", bad,
                            "Nothing was built.")

    def flatten(e) -> list:
        if isinstance(e, relax.Tuple):
            return [x for f in e.fields for x in flatten(f)]
        if isinstance(e, relax.Var) and isinstance(env.get(e), tuple):
            return [x for f in env[e] for x in flatten(f)]
        return [e]

    for i, e in enumerate(flatten(main.body.body)):
        idx = value_of(e)
        t = g.tensors[idx]
        g.outputs.append(IOTensor(f"output{i}", t.shape, t.dtype))
        if t.region == "output" and t.offset == -1:
            t.offset = i  # the first output of an unplanned tensor is written in place
        else:
            g.copies.append((i, idx))
    for idx in fresh.values():
        if g.tensors[idx].offset == -1:  # never returned: give it arena space
            g.tensors[idx].region = "arena"
    return g


# --------------------------------------------------------------------------- TIR: kernels

_WS_ALLOC = re.compile(r"TVMBackendAllocWorkspace\([^,]+,[^,]+,\s*([^,]+),")
_WS_FREE = re.compile(r"TVMBackendFreeWorkspace\(")
_LOCAL = re.compile(r"alloc_buffer\(\(([\d, ]*)\),\s*\"(\w+?)(?:x(\d+))?\"")
_FIELD_GET = re.compile(r"T\.tvm_struct_get\(\w+, 0, (\d+),")
_FIELD_LET = re.compile(r"(\w+): T\.let\[[^\n]*?\] = T\.tvm_struct_get\(\w+, 0, (\d+),")


def _unpassed_reads(text: str) -> list[str]:
    """The DLTensor fields in `_UNPASSED_FIELDS` a (assert-free) host function really uses: a read
    bound to a variable that is never referenced again is dead (LLVM drops it), any other counts."""
    dead = [k for var, k in _FIELD_LET.findall(text) if len(re.findall(rf"\b{var}\b", text)) == 1]
    reads = _FIELD_GET.findall(text)
    for k in dead:
        reads.remove(k)
    return sorted({_UNPASSED_FIELDS[int(k)] for k in reads if int(k) in _UNPASSED_FIELDS})


def _inspect_host(host_mod) -> tuple[dict[str, int], int, list[Unsupported]]:
    """({kernel: workspace peak}, largest kernel stack estimate, problems) from the lowered, assert-free
    host TIR.

    Allocations and frees are replayed in program order (TVM frees workspaces LIFO), each
    rounded to `ALIGN` as the P.c allocator does. Kernels using DLTensor fields the glue does
    not fill in (`_UNPASSED_FIELDS`) are problems.
    """
    import tvm

    ws_peak, stack, bad = {}, 0, []
    for gv, fn in host_mod.functions_items():
        text = fn.script()
        unpassed = _unpassed_reads(text)
        if unpassed:
            bad.append(Unsupported(f"reads tensor {', '.join(unpassed)} at run time", f"kernel {gv.name_hint}",
                                   "the C library passes data pointers only; static shapes need no metadata"))
        cur, peak, sizes = 0, 0, list[int]()
        for m in re.finditer(f"{_WS_ALLOC.pattern}|{_WS_FREE.pattern}", text):
            if m.group(1) is None:
                cur -= sizes.pop() if sizes else 0
                continue
            size = re.fullmatch(r"T\.uint64\((\d+)\)", m.group(1).strip())
            if size is None:
                bad.append(Unsupported(f"workspace of non-constant size {m.group(1)}", f"kernel {gv.name_hint}"))
                continue
            sizes.append(_round(int(size.group(1))))
            cur += sizes[-1]
            peak = max(peak, cur)
        local = 0
        for dims, dtype, lanes in _LOCAL.findall(text):
            n = int(np.prod([int(d) for d in dims.split(",") if d.strip()] or [1]))
            local += n * int(lanes or 1) * max(1, tvm.runtime.DataType(dtype).bits // 8)
        ws_peak[gv.name_hint], stack = peak, max(stack, local)
    return ws_peak, stack + _FRAME_ALLOWANCE, bad


def lower_host(funcs: dict, spec: TargetSpec):
    """The PrimFuncs `funcs` ({name: func with its global_symbol}) lowered to assert-free host TIR."""
    import tvm
    from tvm import tirx
    from tvm.tirx.build import split_host_device_mods

    target = spec.tvm()
    with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
        tmod = tirx.transform.BindTarget(target.with_host(target))(tvm.IRModule(funcs))
        pipeline, finalize_host, _ = tirx.get_default_tir_pipeline(target)
        host, device = split_host_device_mods(pipeline(tmod))
    if any(len(m.functions) for m in device.values()):
        raise LoweringError("some kernels target a device other than the CPU",
                            [Unsupported(str(t), "TIR build") for t, m in device.items() if len(m.functions)])
    return tirx.transform.SkipAssert()(finalize_host()(host))


def _build_kernels(mod, spec: TargetSpec, out: Path, prefix: str) -> tuple[list[str], dict[str, int], int]:
    """Build every PrimFunc into ``out``; returns (kernel names, {kernel: workspace peak}, kernel stack estimate)."""
    import tvm
    from tvm import tirx
    from tvm.tirx.build import codegen_build

    funcs = {gv.name_hint: f.with_attr("global_symbol", f"{prefix}_{gv.name_hint}")
             for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    host = lower_host(funcs, spec)
    ws, stack, bad = _inspect_host(host)
    if bad:
        raise LoweringError("kernels need what the runtime-free C library cannot provide:", bad)
    with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
        codegen_build(host, spec.tvm()).write_to_file(str(out))
    return sorted(funcs), ws, stack


def binutil(spec: TargetSpec, tool: str) -> str:
    """The binutils `tool` (nm, objcopy, ...) beside the spec's GCC cross compiler."""
    if not spec.cross_compiler or not spec.cross_compiler.endswith("gcc"):
        raise LoweringError(f"target {spec.name} has no GCC cross compiler for its C library",
                            [Unsupported(f"cross_compiler={spec.cross_compiler!r}", "target spec",
                                         "set cross_compiler to e.g. 'arm-none-eabi-gcc'")])
    return toolchain.require_tool(spec.cross_compiler[: -len("gcc")] + tool)


def _finish_object(raw: Path, out: Path, spec: TargetSpec, prefix: str) -> list[str]:
    """objcopy the LLVM object: drop debug info and unwind tables (C never unwinds; they would pull in
    the EHABI personality routine), give the runtime hooks per-model names. Returns the hooks used."""
    nm = toolchain.run_tool([binutil(spec, "nm"), str(raw)], "listing the kernel symbols").stdout
    symbols = [ln.split()[-2:] for ln in nm.splitlines() if ln.strip()]
    hooks = sorted(name for kind, name in symbols if kind in ("V", "v", "B", "C") and name in _HOOKS)
    unknown = sorted(name for kind, name in symbols if name.startswith("__TVM") and name not in _HOOKS)
    if unknown:
        raise LoweringError("kernels call TVM runtime functions a runtime-free library cannot provide:",
                            [Unsupported(n, "kernels.o") for n in unknown])
    renames = [a for h in hooks for a in ("--redefine-sym", f"{h}={prefix}{h}")]
    toolchain.run_tool([binutil(spec, "objcopy"), "--strip-debug", "--remove-section=.ARM.exidx*",
                        "--remove-section=.rel.ARM.exidx*", "--strip-symbol=__aeabi_unwind_cpp_pr0", *renames,
                        str(raw), str(out)],
                       "post-processing the kernel object")
    return hooks


def _call_storage(g: _Graph) -> list[dict | None]:
    """Per call, the weight-storage decision (`int8.weight_storage`) of the packed weights it reads."""
    from graphopt.targets.lowering.int8 import layer_key, recorded_decisions

    by_packed = {d["packed_key"]: d for d in recorded_decisions()}
    out = []
    for _, args in g.calls:
        found = None
        for i in args:
            t = g.tensors[i]
            if t.region == "weights" and by_packed:
                array = np.frombuffer(g.weights, np.dtype(t.dtype), int(np.prod(t.shape, dtype=np.int64)), t.offset)
                found = found or by_packed.get(layer_key(array.reshape(t.shape)))
        out.append(found)
    return out


# --------------------------------------------------------------------------- arena

def _place_arena(g: _Graph, ws_by_kernel: dict[str, int]) -> memory_plan.Plan:
    """Give every arena tensor and every call's workspace an offset (`memory_plan`); sets
    ``g.arena_bytes`` and ``g.workspace_at``."""
    calls = len(g.calls)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for k, (_, args) in enumerate(g.calls):
        for i in args:
            if g.tensors[i].region == "arena":
                first.setdefault(i, k)
                last[i] = k
    for _, i in g.copies:  # copied into the caller's output after the last call
        if g.tensors[i].region == "arena":
            first.setdefault(i, calls)
            last[i] = calls
    blocks = [memory_plan.Block(i, first[i], last[i], _round(g.tensors[i].nbytes)) for i in first]
    blocks += [memory_plan.Block(("workspace", k), k, k, _round(ws_by_kernel[name]))
               for k, (name, _) in enumerate(g.calls) if ws_by_kernel.get(name)]
    plan = memory_plan.plan(blocks, calls + 1)
    for i in first:
        g.tensors[i].offset = plan.offsets[i]
    g.workspace_at = [plan.offsets.get(("workspace", k)) for k in range(calls)]
    g.arena_bytes = plan.arena_bytes
    return plan


# --------------------------------------------------------------------------- C sources

def _c_array(ctype: str, name: str, values: list[int], per_line: int = 16) -> str:
    rows = [", ".join(map(str, values[i:i + per_line])) for i in range(0, len(values), per_line)]
    return f"static const {ctype} {name}[{max(1, len(values))}] = {{\n  " + ",\n  ".join(rows or ["0"]) + "\n};"


def _model_c(g: _Graph, kernels: list[str], hooks: list[str], ws_by_kernel: dict[str, int], spec: TargetSpec,
             prefix: str) -> str:
    # compact tables (the glue must stay small): a location is an input, an output, or a scaled offset into
    # the arena / weights; a stream holds per call the kernel index, then the location of every argument,
    # then (kernels that allocate workspace) the location of the call's workspace block in the arena
    up = prefix.upper()
    where = {("input", i): i for i in range(len(g.inputs))}
    where.update({("output", i): len(g.inputs) + i for i in range(len(g.outputs))})
    referenced = {i for _, a in g.calls for i in a} | {i for _, i in g.copies}
    placed = sorted({(t.region, t.offset) for i, t in enumerate(g.tensors)
                     if t.region in ("arena", "weights") and i in referenced}
                    | {("arena", o) for o in g.workspace_at if o is not None})  # arena first
    for key in placed:
        where[key] = len(where)
    offsets = [o for _, o in placed]
    unit = ALIGN
    while any(o % unit for o in offsets):
        unit //= 2
    n_arena = sum(r == "arena" for r, _ in placed)
    used = list(dict.fromkeys(k for k, _ in g.calls))
    stream = [x for (k, a), ws in zip(g.calls, g.workspace_at, strict=True)
              for x in (used.index(k), *(where[(g.tensors[i].region, g.tensors[i].offset)] for i in a),
                        *((where[("arena", ws)],) if ws is not None else ()))]
    stream_t = "uint8_t" if max(stream + [0]) < 1 << 8 else "uint16_t"
    offset_t = "uint16_t" if max(offsets + [0]) // unit < 1 << 16 else "uint32_t"
    max_args = max([len(a) for _, a in g.calls] or [1])
    arity = {k: len(a) for k, a in g.calls}
    protos = "\n".join(f"int32_t __tvm_ffi_{prefix}_{k}(void*, gm_any*, int32_t, gm_any*);" for k in kernels)
    hook_defs, ws_set = [], ""
    if "__TVMBackendAllocWorkspace" in hooks or "__TVMBackendFreeWorkspace" in hooks:
        need = [-(-ws_by_kernel.get(k, 0) // ALIGN) for k in used]
        ws_t = "uint8_t" if max(need + [0]) < 1 << 8 else "uint16_t" if max(need) < 1 << 16 else "uint32_t"
        hook_defs.append(f"""
/* Workspace: a kernel allocates and frees LIFO inside the arena block planned for its call (its exact
 * peak demand, in units of {ALIGN} bytes per kernel: gm_ws_need). */
{_c_array(ws_t, "gm_ws_need", need)}
static uint8_t* gm_ws;
static size_t gm_ws_top, gm_ws_size;

static void* gm_ws_alloc(int device_type, int device_id, uint64_t nbytes, int code, int bits) {{
  size_t need = ((size_t)nbytes + {ALIGN - 1}u) & ~(size_t){ALIGN - 1}u;
  (void)device_type; (void)device_id; (void)code; (void)bits;
  if (need > gm_ws_size - gm_ws_top) return NULL;
  gm_ws_top += need;
  return gm_ws + gm_ws_top - need;
}}

static int gm_ws_free(int device_type, int device_id, void* ptr) {{
  uint8_t* p = (uint8_t*)ptr;
  (void)device_type; (void)device_id;
  if (p < gm_ws || p >= gm_ws + gm_ws_top) return -1;
  gm_ws_top = (size_t)(p - gm_ws);
  return 0;
}}""")
        ws_set = f"""
    if (gm_ws_need[f]) {{
      gm_ws = gm_ptr(*s++, inputs, outputs);
      gm_ws_size = gm_ws_need[f] * {ALIGN}u;
      gm_ws_top = 0;
    }}"""
    if "__TVMBackendParallelLaunch" in hooks or "__TVMBackendParallelBarrier" in hooks:
        hook_defs.append("""
/* Parallel loops run as one task on the calling thread. */
typedef int (*gm_lambda)(int task_id, void* env, void* cdata);
typedef struct { void* sync_handle; int32_t num_task; } gm_parallel_env;""")
    if "__TVMBackendParallelLaunch" in hooks:
        hook_defs.append("""
static int gm_parallel_launch(gm_lambda f, void* cdata, int num_task) {
  gm_parallel_env env = {NULL, 1};
  (void)num_task;
  return f(0, &env, cdata);
}""")
    if "__TVMBackendParallelBarrier" in hooks:
        hook_defs.append("""
static int gm_parallel_barrier(int task_id, void* env) {
  (void)task_id; (void)env;
  return 0;
}""")
    types = {"__TVMBackendAllocWorkspace": "void* (*const {})(int, int, uint64_t, int, int)",
             "__TVMBackendFreeWorkspace": "int (*const {})(int, int, void*)",
             "__TVMBackendParallelLaunch": "int (*const {})(gm_lambda, void*, int)",
             "__TVMBackendParallelBarrier": "int (*const {})(int, void*)"}
    for h in hooks:
        decl = types[h].format(f"{prefix}{h}")
        hook_defs.append(f"extern {decl};\n{decl} = {_HOOKS[h]};")
    copies = "".join(f"\n  memcpy(outputs[{o}], gm_ptr({where[(g.tensors[t].region, g.tensors[t].offset)]}u, inputs, "
                     f"outputs), {IOTensor('', g.tensors[t].shape, g.tensors[t].dtype).nbytes}u);" for o, t in g.copies)
    arena = (f"static uint8_t gm_arena[{g.arena_bytes}] __attribute__((aligned({ALIGN}))) {up}_ARENA_ATTR;"
             if g.arena_bytes else "")
    weights = f"extern const uint8_t {prefix}_weights[];" if g.weights else ""
    ptr = ["  if (id < GM_OUTPUT) return (uint8_t*)inputs[id];",
           "  if (id < GM_PLACED) return (uint8_t*)outputs[id - GM_OUTPUT];"]
    if n_arena:
        ptr.append(f"  if (id < GM_WEIGHTS) return gm_arena + gm_offsets[id - GM_PLACED] * {unit}u;"
                   if n_arena < len(placed) else f"  return gm_arena + gm_offsets[id - GM_PLACED] * {unit}u;")
    if n_arena < len(placed):
        ptr.append(f"  return (uint8_t*){prefix}_weights + gm_offsets[id - GM_PLACED] * {unit}u;")
    if not placed:
        ptr.append("  return NULL;")
    offsets_table = (f"/* arena, then weights offsets, in units of {unit} bytes */\n"
                     f"{_c_array(offset_t, 'gm_offsets', [o // unit for o in offsets])}\n" if offsets else "")
    return f"""/* {prefix}.c: runtime-free inference for target {spec.name} (generated by graphopt; do not edit).
 * Kernels live in kernels.o (TVM packed calling convention); weights in {prefix}_weights.S/.bin. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "{prefix}.h"

#ifndef {up}_ARENA_ATTR
#define {up}_ARENA_ATTR /* e.g. __attribute__((section(".dtcm"))) to place the arenas */
#endif

/* DLPack's DLTensor and tvm-ffi's TVMFFIAny, the layouts the kernels read. The kernels use only
 * data, device, strides (NULL: compact) and byte_offset; graphopt checked they never read shape,
 * ndim or dtype, which are static and compiled in. */
typedef struct {{ int32_t device_type, device_id; }} gm_device;
typedef struct {{ uint8_t code, bits; uint16_t lanes; }} gm_dtype;
typedef struct {{
  void* data; gm_device device; int32_t ndim; gm_dtype dtype;
  const int64_t* shape; const int64_t* strides; uint64_t byte_offset;
}} gm_dltensor;
typedef struct {{ int32_t type_index; uint32_t zero_padding; union {{ int64_t v_int64; void* v_ptr; }} v; }} gm_any;
typedef int32_t (*gm_kernel)(void*, gm_any*, int32_t, gm_any*);
/* locations: inputs, outputs, then arena offsets and weight offsets (gm_offsets) */
enum {{ GM_OUTPUT = {len(g.inputs)}, GM_PLACED = {len(g.inputs) + len(g.outputs)}, \
GM_WEIGHTS = {len(g.inputs) + len(g.outputs) + n_arena}, GM_DLTENSOR_PTR = 7, GM_CPU = 1 }};

{protos}
{weights}
{arena}
{chr(10).join(hook_defs)}

static const gm_kernel gm_kernels[{len(used) or 1}] = {{
{",".join(f"{chr(10)}  __tvm_ffi_{prefix}_{k}" for k in used)[1:] or "  NULL"}
}};

{_c_array("uint8_t", "gm_arity", [arity[k] for k in used])}

{offsets_table}
/* per call: kernel index, then the location of each argument */
{_c_array(stream_t, "gm_stream", stream)}

static uint8_t* gm_ptr(unsigned id, const void* const* inputs, void* const* outputs) {{
{chr(10).join(ptr)}
}}

int {prefix}_run(const void* const* inputs, void* const* outputs) {{
  const {stream_t}* s = gm_stream;
  unsigned i, k;
  for (i = 0; i < {up}_NUM_INPUTS; ++i)
    if ((uintptr_t)inputs[i] % {up}_ALIGN) return {up}_ERR_ALIGN;
  for (i = 0; i < {up}_NUM_OUTPUTS; ++i)
    if ((uintptr_t)outputs[i] % {up}_ALIGN) return {up}_ERR_ALIGN;
  for (k = 1; k <= {len(g.calls)}u; ++k) {{
    gm_dltensor t[{max_args}];
    gm_any v[{max_args}], ret = {{0, 0, {{0}}}};
    unsigned f = *s++, n = gm_arity[f];
    for (i = 0; i < n; ++i) {{
      gm_dltensor x = {{gm_ptr(*s++, inputs, outputs), {{GM_CPU, 0}}, 0, {{0, 0, 0}}, NULL, NULL, 0}};
      t[i] = x;
      v[i].type_index = GM_DLTENSOR_PTR;
      v[i].zero_padding = 0;
      v[i].v.v_ptr = &t[i];
    }}
{ws_set}
    if (gm_kernels[f](NULL, v, (int32_t)n, &ret) != 0) return (int)k;
  }}{copies}
  return 0;
}}
"""


def _model_h(g: _Graph, lib_stats: dict, spec: TargetSpec, prefix: str) -> str:
    up = prefix.upper()
    lines = [
        f"/* {prefix}.h: interface of the runtime-free C library for target {spec.name} (generated by graphopt).",
        f" * {spec.description}",
        f" * Build: compile {prefix}.c and {prefix}_weights.S (with this folder on the include path, for",
        f" * {prefix}_weights.bin) and link kernels.o" + (" and -lm" if lib_stats["libraries"] else "") + ", with",
        f" *   {' '.join(spec.cflags)}",
        f" * or add_subdirectory() this folder in CMake (target {prefix}), or include {prefix}.mk.",
        f" * {prefix}_run() is not reentrant: its arenas are static. Buffers must be {ALIGN}-byte aligned.",
        " */",
        f"#ifndef {up}_H_", f"#define {up}_H_", "", "#include <stdint.h>", "",
        "#ifdef __cplusplus", 'extern "C" {', "#endif", "",
        f"#define {up}_TARGET \"{spec.name}\"",
        f"#define {up}_NUM_INPUTS {len(g.inputs)}",
        f"#define {up}_NUM_OUTPUTS {len(g.outputs)}",
        f"#define {up}_ALIGN {ALIGN}",
        f"#define {up}_ARENA_BYTES {g.arena_bytes}u      /* activations and kernel scratch, reused across layers */",
        f"#define {up}_WEIGHTS_BYTES {len(g.weights)}u",
        f"#define {up}_STACK_BYTES_ESTIMATE {lib_stats['stack_estimate_bytes']}u",
        f"#define {up}_ERR_ALIGN (-1)  /* an input or output buffer is not {up}_ALIGN-aligned */",
    ]
    for kind, items in (("INPUT", g.inputs), ("OUTPUT", g.outputs)):
        for i, t in enumerate(items):
            p = f"{up}_{kind}_{i}"
            lines += ["", f"/* {kind.lower()} {i}: {t.dtype}[{', '.join(map(str, t.shape))}] */",
                      f"#define {p}_DTYPE \"{t.dtype}\"", f"#define {p}_CTYPE {_ctype(t.dtype)}",
                      f"#define {p}_NDIM {len(t.shape)}",
                      f"#define {p}_SHAPE {{{', '.join(map(str, t.shape))}}}",
                      f"#define {p}_NUMEL {int(np.prod(t.shape, dtype=np.int64))}",
                      f"#define {p}_BYTES {t.nbytes}u"]
    lines += [
        "",
        "/* One inference. inputs[i] / outputs[i] point to the buffers described above.",
        f" * Returns 0, {up}_ERR_ALIGN, or k > 0 when the k-th kernel call failed. */",
        f"int {prefix}_run(const void* const* inputs, void* const* outputs);",
        "", "#ifdef __cplusplus", "}", "#endif", f"#endif /* {up}_H_ */", "",
    ]
    return "\n".join(lines)


def _weights_s(has_weights: bool, prefix: str) -> str:
    w = f"{prefix}_weights"
    body = (f'  .section .rodata.{w}, "a"\n  .balign {ALIGN}\n  .global {w}\n'
            f'  .type {w}, %object\n{w}:\n  .incbin "{w}.bin"\n'
            f'  .size {w}, . - {w}\n') if has_weights else ""
    return (f"/* {w}.S: the weights blob ({w}.bin, found on the include path). */\n"
            f"{body}  .section .note.GNU-stack, \"\", %progbits\n")


def _cmake(spec: TargetSpec, libs: list[str], prefix: str) -> str:
    link = f"\ntarget_link_libraries({prefix} PUBLIC {' '.join(libs)})" if libs else ""
    return f"""# graphopt runtime-free C library for target {spec.name} (generated). Use from a firmware project:
#   add_subdirectory(path/to/this/folder)   then   target_link_libraries(app PRIVATE {prefix})
# Compile the firmware with the target's flags, which kernels.o was built for:
#   {' '.join(spec.cflags)}
cmake_minimum_required(VERSION 3.13)
project({prefix} LANGUAGES C ASM)

set({prefix.upper()}_TARGET_FLAGS {' '.join(spec.cflags)})
add_library({prefix} STATIC {prefix}.c {prefix}_weights.S kernels.o)
target_include_directories({prefix} PUBLIC ${{CMAKE_CURRENT_SOURCE_DIR}})
set_source_files_properties({prefix}_weights.S PROPERTIES OBJECT_DEPENDS
                            ${{CMAKE_CURRENT_SOURCE_DIR}}/{prefix}_weights.bin)
set_source_files_properties(kernels.o PROPERTIES EXTERNAL_OBJECT TRUE){link}
"""


def _makefile(spec: TargetSpec, libs: list[str], prefix: str) -> str:
    v = prefix.upper()
    return f"""# graphopt runtime-free C library for target {spec.name} (generated). In your Makefile:
#   include path/to/{prefix}.mk
#   compile $({v}_SRCS) with $({v}_CFLAGS), link $({v}_OBJS) $({v}_LDLIBS)
{v}_DIR := $(dir $(lastword $(MAKEFILE_LIST)))
{v}_SRCS := $({v}_DIR){prefix}.c $({v}_DIR){prefix}_weights.S
{v}_OBJS := $({v}_DIR)kernels.o
{v}_TARGET_FLAGS := {' '.join(spec.cflags)}
{v}_CFLAGS := $({v}_TARGET_FLAGS) -I$({v}_DIR)
{v}_LDLIBS := {' '.join(f'-l{lib}' for lib in libs)}
"""


# --------------------------------------------------------------------------- entry point

def emit_library(ep, spec: TargetSpec, out_dir: Path, name: str = "model") -> CLibrary:
    """Lower `ep` for `spec` and write the C library ``graphopt_<name>`` into `out_dir` (see the module
    docstring); `name` is a C identifier."""
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise ConfigError(f"C library name {name!r} is not a C identifier")
    prefix = f"graphopt_{name}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    state: dict = {}
    planned = _relax_to_planned(ep, spec, phases, state)
    g = run_phase("emit graph", lambda: _walk_main(planned), spec, phases)
    raw = out / ".kernels.llvm.o"
    kernels, ws, kstack = run_phase("build kernels", lambda: _build_kernels(planned, spec, raw, prefix), spec, phases)
    arena = run_phase("place arena", lambda: _place_arena(g, ws), spec, phases)
    try:
        hooks = _finish_object(raw, out / "kernels.o", spec, prefix)
    finally:
        raw.unlink(missing_ok=True)
    max_args = max([len(a) for _, a in g.calls] or [1])
    glue_frame = 128 + max_args * (40 + 16)  # run(): a DLTensor and a TVMFFIAny per argument
    libs = ["m"]  # kernels may call expf/tanhf/...; a static libm only contributes what they use
    stats: dict[str, Any] = {"stack_estimate_bytes": glue_frame + kstack, "libraries": libs}
    (out / f"{prefix}_weights.bin").write_bytes(bytes(g.weights))
    (out / f"{prefix}_weights.S").write_text(_weights_s(bool(g.weights), prefix))
    (out / f"{prefix}.h").write_text(_model_h(g, stats, spec, prefix))
    (out / f"{prefix}.c").write_text(_model_c(g, kernels, hooks, ws, spec, prefix))
    (out / "CMakeLists.txt").write_text(_cmake(spec, libs, prefix))
    (out / f"{prefix}.mk").write_text(_makefile(spec, libs, prefix))
    return CLibrary(folder=out, prefix=prefix, inputs=g.inputs, outputs=g.outputs, kernels=len(kernels),
                    calls=len(g.calls), arena_bytes=g.arena_bytes, arena_lower_bound=arena.lower_bound,
                    workspace_bytes=max([_round(ws.get(k, 0)) for k, _ in g.calls] or [0]),
                    weights_bytes=len(g.weights), stack_estimate_bytes=stats["stack_estimate_bytes"], libraries=libs,
                    live_bytes=list(arena.live_bytes[:len(g.calls)]), call_kernels=[k for k, _ in g.calls],
                    call_weight_bytes=[sum(g.tensors[i].nbytes for i in set(a) if g.tensors[i].region == "weights")
                                       for _, a in g.calls],
                    call_storage=_call_storage(g),
                    stats={"phases": phases, "scheduled": state.get("scheduled", {}),
                           "unscheduled": state.get("unscheduled", []), "shared_kernels": state["shared_kernels"],
                           "arena": {"bytes": arena.arena_bytes, "lower_bound": arena.lower_bound,
                                     "gap": arena.gap_bytes, "placement": arena.strategy},
                           **{k: state[k] for k in ("from_database", "default_kept") if k in state}})
