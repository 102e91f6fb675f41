"""Lower a captured `torch.export.ExportedProgram` through TVM Relax to a VM executable.

`PHASES` are the named steps (import → decompose → layout → legalize → fuse → schedule → build);
`run_phases` is the one runner every user of them shares — `lower` (all of them, for the TVM VM),
the runtime-free C library (through ``schedule``) and tuning (through ``fuse``): it logs and times
each phase and turns TVM's exceptions into `LoweringError`. ``schedule`` schedules every fused
PrimFunc with graphopt's CPU rules (`graphopt.targets.lowering.schedules`) — after applying a
MetaSchedule tuning database when one is active (`graphopt.targets.lowering.tuned.applying`; the
kernels taken from it are listed in ``stats["from_database"]``), then makes kernels too small to share
between cores serial (`graphopt.targets.lowering.small_kernels`, counted in ``stats["serial_kernels"]``)
and, on targets with float vectors, computes float32 ``exp`` in vector registers
(`graphopt.targets.lowering.vector_exp`, counted in ``stats["vector_exp_kernels"]``).
Weights become constants; convolutions are converted to channel-last (`schedules.CONV_LAYOUT`) with the
weight transposes folded at compile time. The executable's ``main`` takes the model's inputs in order and
returns a TVM tuple of its outputs, even for a single output; callers unpack it.

Builds TVM VM executables only (the runtimes that load a .so with the TVM runtime). Refuses (as
`LoweringError`, never a raw TVM traceback): graphs TVM cannot import, legalize or build.
`export_library` refuses (as `ToolchainError`) a compiler that is missing or fails.
"""
from __future__ import annotations

import logging
import pathlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from graphopt.errors import GraphoptError, LoweringError, ToolchainError, Unsupported, quiet_torch_deprecations
from graphopt.targets.spec import TargetSpec

if TYPE_CHECKING:
    import tvm

_LOG = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class LoweringResult:
    executable: tvm.relax.VMExecutable  # built for the spec
    ir_module: tvm.IRModule  # the final scheduled module, before VM lowering
    stats: dict  # JSON-serializable: target, phases, layout, kernels, scheduled, unscheduled, serial_kernels,
    # vector_exp_kernels, single_call


def _import(ep, spec, state):
    from tvm.relax.frontend.torch import from_exported_program

    from graphopt.targets.lowering.converters import converters
    from graphopt.targets.lowering.importing import importing

    with importing(ep, spec), quiet_torch_deprecations():
        return from_exported_program(ep, keep_params_as_input=False, custom_convert_map=converters())


def _decompose(mod, spec, state):
    from tvm import relax

    # inference-mode BatchNorm (and other training-only ops) that earlier passes left behind
    return relax.transform.DecomposeOpsForInference()(mod)


def _rewrite_main(mod, rewrite):
    """Replace each call in ``main`` (the only Relax function the importer emits) by
    ``rewrite(call, args, bound)`` unless that is None, post-order; `args` are the call's arguments
    with variables bound to constants replaced by those constants, ``bound(var)`` the expression a
    variable is bound to (None for parameters)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            args = [self._constant_of(a) for a in call.args]
            new = rewrite(call, args, lambda v: self.lookup_binding(v) if isinstance(v, relax.Var) else None)
            return call if new is None else new

        def _constant_of(self, arg):
            bound = self.lookup_binding(arg) if isinstance(arg, relax.Var) else None
            return bound if isinstance(bound, tvm.ir.expr.Constant) else arg

    mod = mod.clone()
    mod["main"] = _Rewriter(mod).visit_expr(mod["main"])
    return relax.transform.DeadCodeElimination()(mod)


def _clip_to_min_max(call, args, bound):
    """clip(x, lo, hi) -> minimum(maximum(x, lo), hi): ConvertLayout keeps binary ops channel-last
    but wraps clip (ReLU6) in transposes."""
    from tvm import relax
    from tvm.ir import Op

    if not call.op.same_as(Op.get("relax.clip")):
        return None
    dtype = call.args[0].ty.dtype
    lo, hi = (relax.const(float(v.value), dtype) for v in call.args[1:3])
    return relax.op.minimum(relax.op.maximum(call.args[0], lo), hi)


def _fold_constant_transforms(call, args, bound):
    """Transpose/reshape constants (weights) in numpy instead of building a TVM kernel per weight;
    hand constant weights to conv2d/matmul directly so their legalization can pack them."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.ir import Op

    consts = [isinstance(a, tvm.ir.expr.Constant) for a in args]
    if call.op.same_as(Op.get("relax.permute_dims")) and consts[0]:
        data = args[0].value.numpy()
        axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
        return relax.const(np.ascontiguousarray(np.transpose(data, axes)), str(data.dtype))
    if call.op.same_as(Op.get("relax.reshape")) and consts[0] and isinstance(args[1], relax.ShapeExpr) \
            and all(isinstance(v, tvm.tirx.IntImm) for v in args[1].values):
        data = args[0].value.numpy()
        return relax.const(data.reshape([int(v) for v in args[1].values]), str(data.dtype))
    if (call.op.same_as(Op.get("relax.nn.conv2d")) or call.op.same_as(Op.get("relax.matmul"))) and consts[1]:
        return relax.Call(call.op, args, call.attrs, call.ty_args)
    return _pad_between_transposes(call, bound)


def _pad_between_transposes(call, bound):
    """permute(pad(permute(x, p), w), q) with q∘p the identity -> pad(x, w reordered): relax has no
    layout rule for pad, so layout conversion leaves every zero-point pad of a channel-last int8
    conv in NCHW between two transposes."""
    from tvm import relax
    from tvm.ir import Op

    permute, pad = Op.get("relax.permute_dims"), Op.get("relax.nn.pad")
    if not call.op.same_as(permute) or call.attrs.axes is None:
        return None
    padded = bound(call.args[0])
    if not (isinstance(padded, relax.Call) and padded.op.same_as(pad)):
        return None
    inner = bound(padded.args[0])
    if not (isinstance(inner, relax.Call) and inner.op.same_as(permute) and inner.attrs.axes is not None):
        return None
    p, q = [int(a) for a in inner.attrs.axes], [int(a) for a in call.attrs.axes]
    if [p[i] for i in q] != list(range(len(p))):
        return None
    widths = [int(v) for v in padded.attrs.pad_width]  # (before, after) per axis of the padded tensor
    reordered = [w for axis in q for w in widths[2 * axis:2 * axis + 2]]
    return relax.op.nn.pad(inner.args[0], reordered, str(padded.attrs.pad_mode), float(padded.attrs.pad_value))


def _layout(mod, spec, state):
    import tvm
    from tvm import relax

    from graphopt.targets.lowering.schedules import CONV_LAYOUT

    state["layout"] = "as imported"
    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    if any(isinstance(b.value, relax.Call) and b.value.op.same_as(conv2d)
           for block in mod["main"].body.blocks for b in block.bindings):
        converted = _rewrite_main(mod, _clip_to_min_max)
        try:
            mod, state["layout"] = relax.transform.ConvertLayout(CONV_LAYOUT)(converted), "channel-last"
        except Exception:  # noqa: BLE001  TVM's layout inference fails on some graphs; NCHW still lowers
            pass
    from graphopt.targets.lowering.converters import quantize_channel_last

    mod = _rewrite_main(mod, _fold_constant_transforms)
    # not on boards with a flash budget: its unrolled 8-pixel steps are code the scalar Cortex-M pays in flash
    # (cortex-m4 residual_cnn, optimize_for="size": kernels 16.3 → 20.2 KB, flash 1.01 → 1.05x CMSIS-NN's)
    return quantize_channel_last(mod) if spec.flash_bytes is None else mod


def _legalize(mod, spec, state):
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from graphopt.targets.lowering.schedules import fuse_conv_input_pads, legalize_map

    target = spec.tvm()
    winograd: list = []
    with target:
        mod = fuse_conv_input_pads(mod, spec)  # zero-point pads read inside the int8 conv kernels
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + [  # sort/scan/sampling
            relax.transform.LegalizeOps(legalize_map(spec, winograd)),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),  # constant subgraphs the numpy folding left
        ])(mod)
    state["winograd"] = [layer.describe() for layer in winograd]  # the convs lowered as Winograd stages
    return mod


def _fuse(mod, spec, state):
    import tvm
    from tvm import relax

    from graphopt.targets.lowering.accumulator_init import fold_into_init
    from graphopt.targets.lowering.schedules import spatialize_unit_reductions

    with spec.tvm():
        mod = tvm.transform.Sequential([relax.transform.FuseOps(), relax.transform.FuseTIR(),
                                        relax.transform.DeadCodeElimination()])(mod)
    return fold_into_init(spatialize_unit_reductions(mod))  # before any rule or tuning record sees them


def _schedule(mod, spec, state):
    from graphopt.targets.lowering.schedules import schedule_module
    from graphopt.targets.lowering.small_kernels import serial_small_kernels
    from graphopt.targets.lowering.tuned import active_database, apply_database
    from graphopt.targets.lowering.vector_exp import vectorizable_exp

    database = active_database()  # set by compile(database=...): tuned kernels first, rules for the rest
    if database is not None:
        mod, state["from_database"], state["default_kept"] = apply_database(mod, spec, database)
    mod, state["scheduled"], state["unscheduled"] = schedule_module(mod, spec)
    mod, state["serial_kernels"] = serial_small_kernels(mod)
    mod, state["vector_exp_kernels"] = vectorizable_exp(mod, spec)
    state["kernels"] = sum(1 for _, f in mod.functions_items() if f.__class__.__name__ == "PrimFunc")
    state["ir_module"] = mod
    return mod


def _build(mod, spec, state):
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from graphopt.targets.lowering.single_call import build_config, merge_calls

    target = spec.tvm()
    mod, state["single_call"] = merge_calls(mod)  # one kernel call per inference where it pays
    # legalization and fusion are done above; only VM lowering remains
    vm_lowering = tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
    outer = tvm.transform.PassContext.current()
    config = {**outer.config, **build_config(state["single_call"])}
    with tvm.transform.PassContext(opt_level=outer.opt_level, required_pass=outer.required_pass,
                                   disabled_pass=outer.disabled_pass, instruments=outer.instruments, config=config):
        # "compiled": the Relax main becomes native code calling the kernels and VM builtins, instead of
        # bytecode the VM interprets per instruction (ResNet-20 at 32x32, ~70 calls: 0.97x per inference,
        # fp32 and int8, 1 thread, paired; build and export times unchanged)
        return relax.build(mod, target=target, relax_pipeline=vm_lowering, exec_mode="compiled")


# The lowering pipeline: (phase name, fn(ir, spec, state) -> ir), run in order.
PHASES: tuple[tuple[str, Callable], ...] = (
    ("import", _import),
    ("decompose", _decompose),
    ("layout", _layout),
    ("legalize", _legalize),
    ("fuse", _fuse),
    ("schedule", _schedule),
    ("build", _build),
)

HINTS = {
    "import": "the op may need a custom converter (from_exported_program custom_convert_map) or a "
              "rewrite to supported ops before lowering",
    "build": "this is likely a TVM code generation bug; try another target or report the model",
}


def error_line(exc: BaseException) -> str:
    """The message of a (possibly multi-line, traceback-carrying) TVM error in one line: its first
    line and its last error line."""
    lines = [ln.strip() for ln in str(exc).splitlines()
             if ln.strip() and not ln.startswith(("  File ", "Traceback"))]
    last = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1] if lines else "")
    msg = " | ".join(dict.fromkeys(lines[:1] + [last]))
    return f"{type(exc).__name__}: {msg}"[:400]


def run_phase(name: str, fn: Callable[[], T], spec: TargetSpec, timings: dict[str, float]) -> T:
    """Run one phase of a lowering: log its name, add its seconds to ``timings[name]``, and turn any
    exception TVM raises into a `LoweringError` naming the phase (graphopt's own errors pass)."""
    _LOG.info("  %s", name)
    start = time.perf_counter()
    try:
        out = fn()
    except GraphoptError:
        raise
    except Exception as exc:  # TVM raises many types; none may reach the user raw
        raise LoweringError(f"TVM could not lower the model for target {spec.name!r} (phase {name!r})",
                            [Unsupported(error_line(exc), f"lowering phase {name!r}", HINTS.get(name, ""))]) from exc
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 3)
    return out


def run_phases(ir, spec: TargetSpec, state: dict, timings: dict[str, float], *, until: str | None = None,
               skip: Callable[[str, Any], bool] = lambda name, ir: False):
    """Run `PHASES` in order on ``ir`` (an ExportedProgram to begin with) through ``until`` (default:
    all, ending with a VM executable), leaving out those ``skip(name, ir)`` declines; the one phase
    runner of compile (`lower`), the C library (`graphopt.targets.backends.c_emitter`) and tuning."""
    names = [name for name, _ in PHASES]
    if until is not None and until not in names:
        raise ValueError(f"no lowering phase {until!r}; phases are {names}")
    for name, fn in PHASES:
        if not skip(name, ir):
            ir = run_phase(name, lambda: fn(ir, spec, state), spec, timings)  # noqa: B023  called at once
        if name == until:
            break
    return ir


def lower(ep, spec: TargetSpec) -> LoweringResult:
    """Lower `ep` for `spec` through every phase (each logged as it starts)."""
    state: dict = {}
    phases: dict[str, float] = {}
    executable = run_phases(ep, spec, state, phases)
    stats = {
        "target": spec.name,
        "phases": phases,
        "layout": state["layout"],
        "kernels": state["kernels"],
        "scheduled": state["scheduled"],
        "unscheduled": state["unscheduled"],
        "serial_kernels": state["serial_kernels"],
        "vector_exp_kernels": state["vector_exp_kernels"],
    }
    if state.get("winograd"):
        stats["winograd"] = state["winograd"]
    stats["single_call"] = state["single_call"]
    if "from_database" in state:
        stats["from_database"] = state["from_database"]
        stats["default_kept"] = state["default_kept"]
    return LoweringResult(executable=executable, ir_module=state["ir_module"], stats=stats)


def export_library(result: LoweringResult, spec: TargetSpec, path: pathlib.Path) -> pathlib.Path:
    """Write `result` as a shared library for `spec`: loadable by ``tvm.runtime.load_module`` on the
    host, or cross-compiled with ``spec.cross_compiler`` for other targets."""
    from tvm.support import cc

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _LOG.info("  machine code and link")  # LLVM generates the kernels' machine code here, then the linker runs
    fcompile = None
    if spec.cross_compiler:
        if shutil.which(spec.cross_compiler) is None:
            raise ToolchainError(f"cross compiler {spec.cross_compiler!r} for target {spec.name!r} is not on PATH; "
                                 "install it (e.g. apt-get install g++-aarch64-linux-gnu) or fix the target spec")
        fcompile = cc.cross_compiler(spec.cross_compiler)
    try:
        result.executable.export_library(str(path), fcompile=fcompile)
    except Exception as exc:
        raise ToolchainError(f"linking the {spec.name} library {path} failed: {error_line(exc)}") from exc
    return path
