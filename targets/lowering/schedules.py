"""graphopt's default (untuned) CPU schedules for fused TIR PrimFuncs.

TVM's default pipeline leaves every PrimFunc as naive single-threaded loops. Here each fused
PrimFunc (after LegalizeOps + FuseOps + FuseTIR, in the channel-last layout `CONV_LAYOUT` that
lowering converts convolutions to) is matched against `default_rules(params)` in order; the first
rule that schedules it wins. A PrimFunc no rule takes gets `Generic` (parallel outer loop,
vectorized inner loop where TVM proves it legal) and is reported as ``"fallback"``; one even that
fails is left as TVM emitted it and reported as unscheduled.

Before any rule or tuning database sees them, `spatialize_unit_reductions` (run by lowering's fuse
phase) rewrites reductions whose axes all have extent 1 as spatial blocks.

Rules are chosen by `CpuParams` (vector lanes, vector register count, cores) derived from a
`TargetSpec`'s vector width and feature flags, never from its name. Refuses nothing: every failure
to schedule degrades to a slower but correct PrimFunc.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
import tvm.sym
import tvm_ffi
from tvm import relax, s_tir, te, tirx, topi
from tvm.s_tir import dlight

from graphopt.config import OptimizeFor
from graphopt.targets.lowering import intrin_depthwise, intrin_dsp_depthwise, pad_rows, patches
from graphopt.targets.lowering.dot import DOT_ATTR, DotKernel
from graphopt.targets.lowering.fixed_point import has_sqrdmulh, is_srdhm, use_sqrdmulh
from graphopt.targets.lowering.int8 import (
    COLUMNS_NAME,
    DEPTHWISE_ATTR,
    DEPTHWISE_DSP_ATTR,
    GROUPED_ATTR,
    QUANTIZE_NHWC_ATTR,
    active_storage,
    fuse_input_pads,
    legalize_conv2d,
    legalize_depthwise_dot,
    legalize_depthwise_dsp,
    legalize_grouped_conv2d,
    legalize_grouped_dot,
    legalize_grouped_patches,
    legalize_matmul,
)
from graphopt.targets.lowering.kernels import by_intrin, dot_kernels
from graphopt.targets.lowering.lane_conditions import uniform_lane_conditions
from graphopt.targets.lowering.narrowing import narrow_through_int16
from graphopt.targets.lowering.winograd import TRANSFORM_ATTR, WinogradLayer, legalize_winograd
from graphopt.targets.spec import Feature, TargetSpec

# Relax layouts lowering converts conv2d to: channel-last data and HWIO weights, so the output
# channel axis is innermost and contiguous in both output and weights (the axis rules vectorize).
CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}

# Independent accumulator vectors a register tile should have to hide FMA latency (4 cycles x 2 ports).
_MIN_ACCUMULATORS = 8

# Innermost reduction loops this short are unrolled rather than looped.
_SHORT_REDUCTION = 4

# Reductions at most this long are windows (depthwise conv, pooling), not channel sums.
_WINDOW_REDUCTION = 64

# Windows at most this long have all their taps unrolled (`CpuParams.unroll_windows`): a 3×3.
_UNROLLED_WINDOW = 9

# Longer windows, up to this many terms, are short sums (`CpuParams.one_vector_short_sums`).
_SHORT_SUM = 32

# Vector register files by ISA feature, first match wins (AVX2-class x86 is the default).
_VECTOR_REGISTERS = ((Feature.AVX512, 32), (Feature.NEON, 32), (Feature.AVX2, 16))


@dataclass(frozen=True)
class CpuParams:
    """What the schedules need to know about a CPU."""

    lanes: int  # fp32 lanes of one vector register
    vector_regs: int  # architectural vector registers (bounds the accumulator tile)
    cores: int  # threads parallel loops are sized for
    # scalar targets with an FPU (Cortex-M4/M7): the single-precision registers that hold fp32 accumulators
    # (FPv4/FPv5: 32), where the 16 assumed otherwise cut the tile for the integer registers' sake. fp32 on
    # cortex-m4 mobilenet_blocks / plain_cnn / residual_cnn 6.52 / 4.09 / 43.4M → 6.00 / 3.57 / 39.2M
    # instructions, cortex-m7 4.34 / 2.90 / 30.7M → 3.83 / 2.40 / 26.4M; int32 accumulators keep 16 (8, 24 and
    # 36 all counted more on M4 mobilenet_blocks int8's generic depthwise kernels). The larger tiles unroll into
    # more code (M4 fp32 kernels 14.5 / 6.4 / 14.2 KB → 19.1 / 9.3 / 18.5 KB), so `optimize_for="size"` builds
    # keep 16. 0: `vector_regs` for all
    float_regs: int = 0
    dots: tuple[DotKernel, ...] = ()  # int8 dot-product instructions of the target, preferred first
    # NEON: grouped int8 convs take `GroupedInt8` (int16 pair products: smull/smlal). Not on x86, which has no
    # int8×int8→int16 widening multiply: mobilenet_blocks int8 ran 0.185 ms there vs 0.152 on the generic kernel
    int8_pairs: bool = False
    sqrdmulh: bool = False  # aarch64: requantize epilogues staged for `fixed_point.use_sqrdmulh` (`_tile_epilogue`)
    l1d_bytes: int | None = None  # one core's L1 data cache (`TensorizedDot`'s tile model), None if unknown
    depthwise_dot: bool = False  # aarch64 with dotprod: depthwise 3×3 int8 convs take `DepthwiseDot` (lane-wise sdot)
    # scalar Cortex-M DSP targets: depthwise int8 convs take `DepthwiseDsp` (4 channels per SXTB16 pair and
    # SMLAxy): cortex-m4 mobilenet_blocks' three 550.5k / 132.2k / 190.3k → 426.2k / 120.2k / 161.4k, the model
    # 3.53M → 3.37M. Not with MVE (cortex-m55), whose vectorized generic kernel counted less: 3.87M against 4.35M
    depthwise_dsp: bool = False
    winograd: bool = False  # fp32 3×3 stride-1 convs may take `winograd.legalize_winograd` (`TargetSpec.winograd`)
    l2_bytes: int | None = None  # one core's L2 cache (`winograd.choose_tile`), None if unknown
    # x86: a `TensorizedDot` whose pixel-tiles-outer and channel-tiles-outer orders re-stream alike (one
    # channel tile: ResNet-20's 16-channel convs) puts the channel tiles outermost: 0.72-0.88x per
    # kernel, ResNet-20 int8 0.93x end to end (1 thread). Not on ARM or Cortex-M, where that order
    # counted 1.01x the instructions (mobilenet_blocks on arm-a53, residual_cnn on cortex-m4)
    channels_outer_on_ties: bool = False
    # grouped int8 convs may take `int8.legalize_grouped_dot` (a dense dot kernel per group): with an int8 dot
    # instruction (aarch64 dotprod, x86 VNNI). Measured: arm-a55 mobilenet_blocks' 24→32 groups=4 conv 59.0k
    # instructions (grouped kernel + its pad) → 28.2k; host VNNI 32→64 groups=4 at 16×16 392 → 17 µs (the generic
    # kernel); arm-a53's NEON 4×4 kernel lost to the grouped kernel (24→32 groups=4: 158k against 61k). Scalar
    # Cortex-M DSP targets too (the SMLAD kernels): cortex-m4 mobilenet_blocks' 24→32 groups=4 conv 292.2k → 202.7k
    # (the generic kernel: LDRSB and SMLABB per MAC), arena unchanged
    grouped_dot: bool = False
    # x86: every tap of a window reduction of at most `_UNROLLED_WINDOW` (depthwise 3×3) unrolled, not only the
    # innermost: MobileNetV2's fp32 depthwise convs 0.86-0.98x alone (1 and 2 threads). Not measured on ARM
    # (whose fp32 depthwise convs would change too) nor on the Cortex-M, whose flash the unrolled copies would grow
    unroll_windows: bool = False
    # AVX-512: sums of at most `_SHORT_SUM` terms (1×1 convs over ≤ 32 channels) take one-vector channel tiles of
    # twice the pixels (16 ch × 14 px rather than 32 × 7): MobileNetV2's 16→96 expand at 112×112 0.89x (2 threads)
    # / 0.91x (1 thread) alone, 32→192 at 28×28 0.94x / 0.96x, its 3×3×3 stem 0.95x; ResNet-20's kernels
    # 0.96-1.00x (1 thread)
    one_vector_short_sums: bool = False
    # NEON: few-channel int8 convs may read their windows from a `patches` copy of their input
    # (`int8.legalize_conv2d`): mobilenet_blocks' RGB stem 71.4k → 43.1k instructions on arm-a53 (26.9k → 18.3k
    # on arm-a55), plain_cnn's 1-channel one 120.6k → 78.8k (117.2k → 40.7k; it took the generic kernel).
    # Not on x86, whose VNNI kernel pads rows less (36 values against 28 for an RGB 3×3): the models ran
    # 1.008-1.018x the latency with it (300 alternating calls); nor on the Cortex-M, whose arena would hold the
    # copy beside the input
    im2col: bool = False
    # NEON and scalar targets: int8 NHWC zero-point pads (those the conv kernels do not read inside) as row
    # copies, `pad_rows`. On scalar targets (cortex-m4: 16-byte runs as 4 LDR/STR pairs) not with
    # optimize_for="size", whose flash the unrolled runs grow: M4 mobilenet_blocks' 18×18×64 pads 26.5k → 12.3k
    # instructions each, the model 3,278,553 → 3,247,211, flash +388 B; residual_cnn 16,652,062 → 16,610,324,
    # +832 B. Not on the Cortex-M55, whose MVE pads gained nothing there (mobilenet_blocks +1.5k, residual_cnn −33k)
    row_pads: bool = False

    @classmethod
    def from_spec(cls, spec: TargetSpec) -> CpuParams:
        regs = next((n for feat, n in _VECTOR_REGISTERS if spec.has(feat)), 16)
        scalar_dsp = spec.has(Feature.DSP) and spec.vector_bits == 0  # no vector unit (M55: MVE)
        return cls(lanes=max(1, spec.vector_bits // 32), vector_regs=regs, cores=spec.num_cores,
                   float_regs=32 if spec.vector_bits == 0 and spec.has(Feature.FPU_SP) else 0,
                   dots=dot_kernels(spec), int8_pairs=spec.has(Feature.NEON), sqrdmulh=has_sqrdmulh(spec),
                   l1d_bytes=spec.l1d_bytes, depthwise_dot=spec.has(Feature.A64) and spec.has(Feature.DOTPROD),
                   depthwise_dsp=scalar_dsp,
                   winograd=spec.winograd, l2_bytes=spec.l2_bytes,
                   channels_outer_on_ties=spec.has(Feature.AVX2) or spec.has(Feature.AVX512),
                   grouped_dot=spec.has(Feature.DOTPROD) or spec.has(Feature.AVX512_VNNI) or scalar_dsp,
                   unroll_windows=spec.has(Feature.AVX2) or spec.has(Feature.AVX512),
                   one_vector_short_sums=spec.has(Feature.AVX512),
                   im2col=spec.has(Feature.NEON), row_pads=spec.has(Feature.NEON) or spec.vector_bits == 0)


def _int(expr) -> int | None:
    return int(expr) if isinstance(expr, (int, tirx.IntImm)) else None


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _lane_tile(extent: int, lanes: int) -> int:
    """Tile of the vectorized (innermost output) axis: two vectors, one, or the largest power-of-two
    part of a vector that divides it; else the whole axis if short, else its largest short divisor."""
    for tile in (2 * lanes, lanes, lanes // 2, lanes // 4):
        if tile >= 4 and extent % tile == 0:
            return tile
    return extent if extent <= 2 * lanes else _largest_divisor(extent, 2 * lanes)


def _conv2d_nhwc_packed(data, wpack, strides, padding, dilation, groups, out_dtype):
    """NHWC conv2d over weights packed as [F/ft, KH, KW, C/groups, ft] (regular, grouped, depthwise)."""
    _, height, width, _ = data.shape
    f_outer, kh, kw, c_group, f_tile = (int(d) for d in wpack.shape)
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilation, padding
    if any((pt, pl, pb, pr)):
        data = topi.nn.pad(data, [0, pt, pl, 0], [0, pb, pr, 0], name="pad_temp")
    out_h = (height + pt + pb - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + pl + pr - dw * (kw - 1) - 1) // sw + 1
    per_group = f_outer * f_tile // groups
    ry, rx, rc = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, c_group), "rc")

    def body(n, y, x, f):
        cin = rc if groups == 1 else f // per_group * c_group + rc
        a = data[n, y * sh + ry * dh, x * sw + rx * dw, cin].astype(out_dtype)
        return te.sum(a * wpack[f // f_tile, ry, rx, rc, f % f_tile].astype(out_dtype), axis=[ry, rx, rc])

    return te.compute((data.shape[0], out_h, out_w, f_outer * f_tile), body, name="conv2d_nhwc")


def fuse_conv_input_pads(mod: tvm.IRModule, spec: TargetSpec) -> tvm.IRModule:
    """`int8.fuse_input_pads` into `spec`'s dot-product conv kernels (before LegalizeOps), whose
    `TensorizedDot` schedule copies the input once per kernel anyway (per-group ones of grouped convs,
    `int8.legalize_grouped_dot`, included), and into the depthwise ``sdot`` kernel's re-layout
    (`int8.legalize_depthwise_dot`), which does too. Not into `GroupedInt8`'s: it reads
    the input in place, so a border test lands on every tap's load (mobilenet_blocks' depthwise convs
    on arm-a55: +30k instructions each against 11k for a separate pad — 3.4k on arm-a53 since `pad_rows`).
    Nor on boards with a RAM budget, whose arena holds the kernel's padded copy beside its input and output
    (cortex-m4 residual_cnn: 51,264 → 67,648 B)."""
    params = CpuParams.from_spec(spec)
    if not params.dots or spec.ram_bytes is not None:
        return mod

    def legalize(bb, call, value):
        out = legalize_conv2d(bb, call, params.dots, value)
        if out is None and params.depthwise_dot:
            out = legalize_depthwise_dot(bb, call, value)
        return legalize_grouped_dot(bb, call, params.dots, value) if out is None and params.grouped_dot else out

    return fuse_input_pads(mod, legalize)


def conv2d_legalizer(params: CpuParams, winograd: list[WinogradLayer] | None = None):
    """LegalizeOps override for NHWC/HWIO conv2d: packs the weights once (folded at compile time when
    they are constants) so each output-channel tile reads one contiguous weight slab; other layouts
    and shapes use TVM's own legalization. With `CpuParams.winograd`, the fp32 3×3 stride-1 convs
    `winograd.legalize_winograd` takes become its three stages, each appended to `winograd`."""
    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")

    def legalize(bb, call):
        packed = legalize_conv2d(bb, call, params.dots, im2col=params.im2col) if params.dots else None
        if packed is None and params.depthwise_dot:
            packed = legalize_depthwise_dot(bb, call)
        if packed is None and params.depthwise_dsp:
            packed = legalize_depthwise_dsp(bb, call, intrin_dsp_depthwise.KERNELS)
        if packed is None and params.grouped_dot:
            packed = legalize_grouped_dot(bb, call, params.dots)
        if packed is None and params.im2col and not params.grouped_dot:
            packed = legalize_grouped_patches(bb, call, params.dots)
        if packed is None and params.int8_pairs:
            packed = legalize_grouped_conv2d(bb, call, 4 * params.lanes)
        if packed is None and params.winograd:
            packed = legalize_winograd(bb, call, lambda f: _lane_tile(f, params.lanes), winograd, params.l2_bytes)
        if packed is not None:
            return packed
        attrs = call.attrs
        wshape = call.args[1].ty.shape
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC") \
                or wshape is None or any(_int(d) is None for d in wshape):
            return default(bb, call)
        kh, kw, c_group, f = (int(d) for d in wshape)
        f_tile = _lane_tile(f, params.lanes)
        if isinstance(call.args[1], tvm.ir.expr.Constant):  # a weight: pack it now, in numpy
            w = call.args[1].value.numpy().reshape(kh, kw, c_group, f // f_tile, f_tile)
            packed = relax.const(np.ascontiguousarray(w.transpose(3, 0, 1, 2, 4)))
        else:
            packed = bb.emit(bb.call_te(
                lambda w: te.compute((f // f_tile, kh, kw, c_group, f_tile),
                                     lambda a, y, x, c, b: w[y, x, c, a * f_tile + b], name="packed_weight"),
                call.args[1], primfunc_name_hint="pack_conv2d_weight"))
        out_dtype = attrs.out_dtype if attrs.out_dtype != "" else call.args[0].ty.dtype
        return bb.call_te(_conv2d_nhwc_packed, call.args[0], packed,
                          [int(v) for v in attrs.strides], [int(v) for v in attrs.padding],
                          [int(v) for v in attrs.dilation], int(attrs.groups), str(out_dtype),
                          primfunc_name_hint="conv2d")

    return legalize


def matmul_legalizer(params: CpuParams):
    """LegalizeOps override for ``x @ W`` with a constant 2-D W (Linear layers): W [K, N] is packed
    to [N/ft, K, ft] in numpy so each output tile streams one contiguous slab."""
    default = tvm.ir.Op.get("relax.matmul").get_attr("FLegalize")

    def legalize(bb, call):
        packed = legalize_matmul(bb, call, params.dots) if params.dots else None
        if packed is not None:
            return packed
        a, w = call.args
        if not isinstance(w, tvm.ir.expr.Constant) or len(w.ty.shape) != 2 or a.ty.ndim < 2 \
                or str(w.ty.dtype) != str(a.ty.dtype):
            return default(bb, call)
        k, n = (int(d) for d in w.ty.shape)
        f_tile = _lane_tile(n, params.lanes)
        packed = relax.const(np.ascontiguousarray(w.value.numpy().reshape(k, n // f_tile, f_tile).transpose(1, 0, 2)))
        out_dtype = call.attrs.out_dtype if str(call.attrs.out_dtype) != "" else a.ty.dtype

        def matmul(x, wp):
            r = te.reduce_axis((0, k), "k")
            return te.compute(
                (*x.shape[:-1], n),
                lambda *i: te.sum(x[(*i[:-1], r)].astype(out_dtype)
                                  * wp[i[-1] // f_tile, r, i[-1] % f_tile].astype(out_dtype), axis=r),
                name="matmul")

        return bb.call_te(matmul, a, packed, primfunc_name_hint="matmul")

    return legalize


def widening_multiply_legalizer():
    """LegalizeOps override for int64 ``x · c`` with ``c`` a constant whose values fit int32 (the
    requantization multipliers): ``c`` is kept int32 and widened inside the kernel, so the code
    generator sees a 32×32→64 product (``smull`` on ARM, one multiply on Cortex-M) instead of a
    full 64-bit multiply of a value loaded from an int64 table (scalar on NEON)."""
    default = tvm.ir.Op.get("relax.multiply").get_attr("FLegalize")
    limit = 2 ** 31

    def legalize(bb, call):
        x, c = call.args
        bound = bb.lookup_binding(c) if isinstance(c, relax.Var) else None
        if isinstance(bound, tvm.ir.expr.Constant):  # e.g. a channel-last copy bound by layout conversion
            c = bound
        if str(call.ty.dtype) != "int64" or not isinstance(c, tvm.ir.expr.Constant) or x.ty.ndim < c.ty.ndim:
            return default(bb, call)
        values = c.value.numpy()
        if values.size and (values.min() < -limit or values.max() >= limit):
            return default(bb, call)
        if values.size == 1:  # an immediate: materialized where it is used, so ARM selects SMMULR/SMULL
            return bb.call_te(lambda a: topi.multiply(a, tirx.const(int(values.reshape(())), "int64")), x,
                              primfunc_name_hint="multiply")
        return bb.call_te(lambda a, m: topi.multiply(a, topi.cast(m, "int64")), x,
                          relax.const(values.astype(np.int32), "int32"), primfunc_name_hint="multiply")

    return legalize


def legalize_map(spec: TargetSpec, winograd: list[WinogradLayer] | None = None) -> dict:
    """LegalizeOps overrides whose computes (packed weights, widening products, Winograd stages) the
    rules below are written for; the convs that take Winograd are appended to `winograd`."""
    params = CpuParams.from_spec(spec)
    overrides = {"relax.nn.conv2d": conv2d_legalizer(params, winograd), "relax.matmul": matmul_legalizer(params),
                 "relax.multiply": widening_multiply_legalizer()}
    if params.row_pads and (params.lanes > 1 or active_storage().optimize_for is not OptimizeFor.SIZE):
        overrides["relax.nn.pad"] = pad_rows.legalizer()
    return overrides


def _stores(stmt) -> list | None:
    """The buffer stores of a block's init (one store, or a sequence of them), else None."""
    if isinstance(stmt, tirx.BufferStore):
        return [stmt]
    if isinstance(stmt, tirx.SeqStmt) and all(isinstance(s, tirx.BufferStore) for s in stmt.seq):
        return list(stmt.seq)
    return None


class _Keep(Exception):
    """The block reads its accumulator other than at the element it updates: leave it as it is."""


def _reads(expr, buffers) -> bool:
    """Whether `expr` loads from any of `buffers`."""
    found = []
    tvm_ffi.structural_walk(expr, (tvm.ir.TensorLoad, lambda load: found.append(any(load.source.same_as(b)
                                                                                    for b in buffers))))
    return any(found)


def _spatialize(realize):
    """`realize` with its block ``init: C[i] = c; body: C[i] = f(C[i], x)`` rewritten as the spatial
    ``C[i] = f(c, x)`` when each of its reduction axes has extent 1 (e.g. a Linear(1, N), a 1×1 conv
    with one input channel per group, a 1×1 pool); any other block unchanged."""
    block = realize.block
    reduce = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    inits = None if block.init is None else _stores(block.init)
    if inits is None or not reduce or any(_int(iv.dom.extent) != 1 for iv in reduce):
        return realize
    at_min = [(iv.var, iv.dom.min) for iv in reduce]

    def sub(node):  # reduction variables -> their only value
        return tvm_ffi.structural_map(node, (tvm.ir.Var, lambda v: next((m for r, m in at_min if r.same_as(v)), v)))

    def initial(load):  # the accumulator's read -> its initial value
        for store in inits:
            if store.buffer.same_as(load.source):
                if not tvm_ffi.structural_equal(list(load.indices), list(sub(store.indices))):
                    raise _Keep
                return sub(store.value)
        return load

    stores = []  # a tuple reduction (argmax) reads its accumulators in let bindings, then stores them all
    tvm_ffi.structural_walk(block.body, (tirx.BufferStore, stores.append))
    if len(stores) > 1 and any(_reads(s.value, [i.buffer for i in inits]) for s in stores):
        return realize  # a store could read what another store of this update wrote
    try:
        body = tvm_ffi.structural_map(sub(block.body), (tvm.ir.TensorLoad, initial))
    except _Keep:
        return realize
    written = [w.source for w in block.writes]
    keep = [i for i, iv in enumerate(block.iter_vars) if iv.iter_type != tirx.IterVar.CommReduce]
    spatial = s_tir.SBlock([block.iter_vars[i] for i in keep],
                           [sub(r) for r in block.reads if not any(r.source.same_as(b) for b in written)],
                           list(block.writes), block.name_hint, body, None, list(block.alloc_buffers),
                           list(block.match_buffers), dict(block.annotations))
    return s_tir.SBlockRealize([realize.iter_values[i] for i in keep], realize.predicate, spatial)


def _mentions(stmt, var) -> bool:
    found = []
    tvm_ffi.structural_walk(stmt, (tvm.ir.Var, lambda v: found.append(True) if v.same_as(var) else None))
    return bool(found)


def _drop_unused_unit_loop(loop):
    """``for k in range(1): S`` -> S when S no longer uses k (the loop of a spatialized reduction
    axis): dlight's normalization needs one loop per block iterator."""
    return loop.body if _int(loop.extent) == 1 and not _mentions(loop.body, loop.loop_var) else loop


def spatialize_unit_reductions(mod: tvm.IRModule) -> tvm.IRModule:
    """Rewrite every reduction whose axes all have extent 1 as a spatial block (and drop the loops of
    those axes), in the PrimFuncs of `mod` not yet scheduled.

    TVM keeps such a block a reduction (an init and an accumulating update). dlight's
    ``normalize_prim_func`` drops its unit reduction iterators but keeps the init, so every rule sees
    a spatial block, and inlining the epilogue into it (``reverse_compute_inline``, as `Injective`
    and dlight's ``try_inline`` do) applies the epilogue to the init and to the update: a bias added
    twice in fp32 (Linear(1, N), 1×1 convs with one input channel per group: 10 % to 10× off), and in
    int8 a requantize of the integer init that TVM cannot build (``IntImm supports only int or uint
    or bool type, but float32 was supplied``). As a plain spatial block every rule schedules it
    correctly.
    """
    mod = mod.clone()
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and not (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
            mod[gv] = tvm_ffi.structural_map(func, [(s_tir.SBlockRealize, _spatialize),
                                                    (tirx.For, _drop_unused_unit_loop)])
    return mod


def _loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    return _int(sch.get(loop).extent)


class _SerialSchedule:
    """`s_tir.Schedule` for `schedule_spatial` with ``parallel`` a no-op (the loops stay serial)."""

    def __init__(self, sch: s_tir.Schedule):
        self._sch = sch

    def parallel(self, loop) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._sch, name)


def _vectorize_innermost(sch: s_tir.Schedule, loop, lanes: int) -> None:
    """Vectorize the largest power-of-two part (at most two vectors) of `loop` that divides it; TVM's
    code for odd-width vectors is many times slower than for power-of-two ones."""
    extent = _loop_extent(sch, loop)
    if extent is None:
        return
    tile = next((t for t in (2 * lanes, lanes, lanes // 2, lanes // 4, 2) if t >= 2 and extent % t == 0), 1)
    if tile == 1:
        return
    if tile < extent:
        _, loop = sch.split(loop, [None, tile])
    sch.vectorize(loop)


# Innermost spatial loops this short (e.g. the 3 channels of an NHWC image) are unrolled, not vectorized
_SHORT_SPATIAL = 3


# An int8 kernel's prologue (a padded or re-laid input copy) writing at most this many bytes runs serially
# inside the kernel: a parallel region of its own cost ~800 instructions per call on arm-a55 (the runtime's
# launch, single-threaded) for a few hundred instructions of copying, and a core's worth of work no other core
# can share usefully (a 16 KiB copy: ~1 µs)
_SERIAL_PROLOGUE_BYTES = 16 * 1024


def _written_bytes(sch: s_tir.Schedule, block) -> int | None:
    buf = sch.get(block).writes[0].source
    size = max(1, tvm.DataType(str(buf.dtype)).bits // 8)
    for d in buf.shape:
        extent = _int(d)
        if extent is None:
            return None
        size *= extent
    return size


def schedule_spatial(sch: s_tir.Schedule, block, lanes: int, serial_below: int = 0) -> None:
    """Parallelize the outer loops of a spatial block and vectorize its innermost loop. An innermost loop
    of at most `_SHORT_SPATIAL` is unrolled inside a serial loop over the next axis instead: fused into
    the parallel loop, that axis cost an index division per element (a graph input's NCHW → NHWC
    transpose and zero-point pad, 3×34×34 int8: 7.9 instructions per element on arm-a55). Not on scalar
    targets (Cortex-M4), whose flash the unrolled copies would grow. A block writing fewer than `serial_below`
    bytes is not parallelized (`_SERIAL_PROLOGUE_BYTES`)."""
    loops = sch.get_loops(block)
    if serial_below:
        size = _written_bytes(sch, block)
        if size is not None and size < serial_below:
            sch = _SerialSchedule(sch)
    short = lanes > 1 and len(loops) > 2 and (_loop_extent(sch, loops[-1]) or _SHORT_SPATIAL + 1) <= _SHORT_SPATIAL
    if short:
        sch.parallel(sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0])
        sch.unroll(loops[-1])
        return
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
    _vectorize_innermost(sch, sch.get_loops(block)[-1], lanes)


# TVM puts a buffer on the stack only below this many bytes; others go to the heap (and out of registers).
_STACK_BYTES = 1024


def _stages_fixed_point(sch: s_tir.Schedule, block) -> bool:
    """Whether `block` (its producers inlined) computes a requantize's rounding doubling high multiply."""
    store = sch.get(block).body
    return isinstance(store, tirx.BufferStore) and is_srdhm(store.value)


def _tile_epilogue(sch: s_tir.Schedule, main, consumers: list, tile_loop, lanes: int,
                   tile_shape: list | None = None, staged: bool = False, serial_below: int = 0) -> None:
    """Apply the fused epilogue blocks per accumulator tile while it is hot. A block read by one
    consumer, or not reading the accumulator at all (e.g. the other operand's rescale in a fused
    residual add), is inlined; a block read by several (e.g. the fixed-point ``high`` term of a
    requantize) is computed once per tile into a tile-sized buffer — inlining those duplicates their
    expressions at every use, which grows chained requantizations multiplicatively (and once made
    LLVM run for many minutes). An epilogue that does not map onto the tile (e.g. a fused transpose,
    or a pad, whose output is larger) runs as its own loop nest; with no epilogue, the accumulator is
    written back per tile. `tile_shape`: the output shape the tile covers (default: the accumulator's).

    `staged` (aarch64, `fixed_point`): the fixed-point products are computed per tile as a block of their
    own, in the 4-lane vectors ``sqrdmulh`` exists for, and the narrowing to int8 after them in vectors as
    wide as the tile's channels; both unrolled, so the tile stays in registers between them (one vector
    loop for both computes the int8 narrowing 4 lanes at a time). `serial_below`: `schedule_spatial`'s, for the
    epilogue blocks with a loop nest of their own."""
    placed = []
    on_main = {sch.get(main).name_hint}  # blocks reading the accumulator, directly or not
    tile_shape = tile_shape or [_int(d) for d in sch.get(main).writes[0].source.shape]
    for block in consumers:
        name = sch.get(block).name_hint
        if {sch.get(p).name_hint for p in sch.get_producers(block)} & on_main:
            on_main.add(name)
        if staged and block is not consumers[-1] and name in on_main and _stages_fixed_point(sch, block):
            sch.reverse_compute_at(block, tile_loop, preserve_unit_loops=True)
            placed.append(block)
        elif block is not consumers[-1] and len(sch.get_consumers(block)) == 1:
            sch.compute_inline(block)
        elif name not in on_main:  # e.g. the other operand's rescale in a fused residual add: a
            sch.compute_inline(block)  # few ops per element, cheaper recomputed than stored
        elif [_int(d) for d in sch.get(block).writes[0].source.shape] != tile_shape:
            # e.g. a fused pad: reverse_compute_at would cover only the elements the tiles produce
            # and leave its border unwritten
            schedule_spatial(sch, block, lanes, serial_below)
        else:
            try:
                sch.reverse_compute_at(block, tile_loop, preserve_unit_loops=True)
                placed.append(block)
            except Exception:  # noqa: BLE001  TVM refused: the block does not map onto the tile
                schedule_spatial(sch, block, lanes, serial_below)
    if not consumers:
        placed.append(sch.cache_write(main, 0, "global"))
        sch.reverse_compute_at(placed[-1], tile_loop, preserve_unit_loops=True)
    for block in placed:
        if lanes > 1:  # scalar targets (Cortex-M4): a <2 x i64> fixed-point product loses its 32x32->64 multiply
            widest = (lanes // 2 if _stages_fixed_point(sch, block) else 2 * lanes) if staged else lanes
            _vectorize_innermost(sch, sch.get_loops(block)[-1], widest)
        if staged:
            loops = sch.get_loops(block)
            below = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(tile_loop))) + 1
            for loop in loops[below:]:
                if sch.get(loop).kind != tirx.ForKind.VECTORIZED:
                    sch.unroll(loop)


def _annotated_reduction(sch: s_tir.Schedule, attr: str) -> tuple[list, int] | None:
    """The normalized blocks of `sch` and the index of the one annotated with `attr`, when that block is
    the PrimFunc's only reduction (the rest its injective prologue and epilogue); else None."""
    infos = dlight.analysis.normalize_prim_func(sch)
    if infos is None:
        return None
    idx = next((i for i, b in enumerate(infos) if attr in sch.get(b.block_rv).annotations), None)
    if idx is None or sum(1 for b in infos if not b.is_injective()) != 1:
        return None
    return infos, idx


class ChannelLastReduction(dlight.ScheduleRule):
    """One reduction whose innermost output axis is its last spatial axis: conv2d (regular,
    depthwise, grouped) in NHWC, dense/matmul, pooling and mean in NHWC, with any injective
    prologue (padding) and epilogue (bias, residual add, activation).

    Register-blocks (second-last spatial axis x innermost axis) into an accumulator tile held in
    vector registers, loops the reduction around it, parallelizes over the outer tiles, and
    applies the fused epilogue to each tile while it is hot.
    """

    def __init__(self, params: CpuParams):
        self.params = params

    def apply(self, func, target, tunable):
        sch = s_tir.Schedule(func)
        infos = dlight.analysis.normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [i for i, b in enumerate(infos) if not b.is_injective()]
        if len(reductions) != 1:
            return None
        idx = reductions[0]
        main, producers, consumers = infos[idx], infos[:idx], infos[idx + 1:]
        kinds = main.dom_kind()
        n_s = len(kinds) - len(kinds.lstrip("S"))
        if n_s == 0 or kinds[n_s:] != "R" * (len(kinds) - n_s):
            return None
        write = sch.get(main.block_rv).writes[0].region
        write_dtype = str(sch.get(main.block_rv).writes[0].source.dtype)
        if not write[-1].min.same_as(main.iters[n_s - 1].var) or _int(main.iters[n_s - 1].dom) is None:
            return None

        vector_read = [b.block_rv for b in producers
                       if _read_along(sch, main.block_rv, b.block_rv, main.iters[n_s - 1].var)]
        p = self.params
        f_ext = _int(main.iters[n_s - 1].dom)
        loops = sch.get_loops(main.block_rv)
        spatial, reduce = loops[:n_s], loops[n_s:]
        window = 1
        for r in reduce:
            window *= _loop_extent(sch, r) or _WINDOW_REDUCTION + 1
        f_tile = _lane_tile(f_ext, p.lanes)
        if p.one_vector_short_sums and _UNROLLED_WINDOW < window <= _SHORT_SUM:
            f_tile = min(f_tile, p.lanes)  # twice the pixels instead
        vecs = -(-f_tile // p.lanes)
        fo, fi = sch.split(spatial[-1], [None, f_tile])
        outer, wi = spatial[:-1], None
        if n_s >= 2 and _int(main.iters[n_s - 2].dom) is not None:
            # below what TVM keeps on the stack: a larger tile went to TVMBackendAllocWorkspace, was zeroed
            # by a memset and spilled (AVX-512's 28 px × 16 channels, 1,792 B: MobileNetV2's depthwise 3×3 over
            # 144 channels at 56×56 334 → 100 µs alone, 2 threads; its 1×1 expand 24→144 0.78×); so did
            # 8 px × 32 channels, exactly 1 KiB (its 16→96 expand at 112×112 0.79×, the stem 0.77×)
            regs = p.float_regs if p.float_regs and write_dtype == "float32" \
                and active_storage().optimize_for is not OptimizeFor.SIZE else p.vector_regs
            w_tile = _largest_divisor(_int(main.iters[n_s - 2].dom),
                                      max(1, min((regs - 4) // vecs, (_STACK_BYTES - 1) // (4 * f_tile))))
            wo, wi = sch.split(spatial[-2], [None, w_tile])
            outer = spatial[:-2] + [wo]
        # few accumulators (e.g. a batch-1 dense): add output-channel tiles to the register block
        # so independent FMA chains hide the FMA latency
        rows = _loop_extent(sch, wi) if wi is not None else 1
        fo_ext, unroll = _loop_extent(sch, fo), 1
        if fo_ext is not None and rows * vecs < _MIN_ACCUMULATORS:  # keeping a task per core
            limit = min(_MIN_ACCUMULATORS // (rows * vecs), max(1, fo_ext // p.cores))
            unroll = _largest_divisor(fo_ext, max(1, limit))
        fo, fu = sch.split(fo, [None, unroll])
        # channel tiles outermost when each re-reads a large weight slab (keeps it in cache), else
        # innermost (depthwise, pooling: neighbouring channels share cache lines)
        # ... unless all the weights fit in half of a known L1: channel tiles outermost then gave the two
        # cores the two channel halves of the same pixels (cache lines written by both)
        weight_bytes = window * f_ext * 4
        pixels_outer = window <= _WINDOW_REDUCTION or (p.l1d_bytes is not None and 2 * weight_bytes <= p.l1d_bytes)
        tiles = outer + [fo] if pixels_outer else [fo] + outer
        if _parallel_extent(sch, tiles) < p.cores:  # e.g. a small matmul: parallelize its channels
            tiles = [fo] + outer
        sch.reorder(*tiles, *reduce, fu, *([wi] if wi is not None else []), fi)
        sch.unroll(fu)
        if p.unroll_windows and window <= _UNROLLED_WINDOW:
            for r in reduce:  # all taps of a depthwise 3×3 / pooling window
                sch.unroll(r)
        elif _loop_extent(sch, reduce[-1]) is not None and _loop_extent(sch, reduce[-1]) <= _SHORT_REDUCTION:
            sch.unroll(reduce[-1])  # e.g. the 3 input channels of a stem conv
        tile_loop = tiles[-1]  # stays valid: only the loops before it are fused
        sch.parallel(sch.fuse(*tiles[:-1]) if len(tiles) > 2 else tiles[0])

        # epilogue: inlined into one block computed per accumulator tile; an epilogue that does
        # not map onto the tile (e.g. a fused transpose) runs as its own loop nest instead
        _tile_epilogue(sch, main.block_rv, [c.block_rv for c in consumers], tile_loop, p.lanes)

        if wi is not None:
            sch.unroll(wi)
        sch.vectorize(fi)  # before decompose_reduction: TVM only vectorizes blocks that keep their init
        sch.decompose_reduction(main.block_rv, reduce[0])

        for b in producers:
            if b.block_rv in vector_read:
                sch.compute_inline(b.block_rv)  # e.g. pooling/depthwise padding: a vector select
            else:
                schedule_spatial(sch, b.block_rv, p.lanes)
        return sch



class WinogradTransform(dlight.ScheduleRule):
    """The input and output transforms of `winograd.legalize_winograd` (`TRANSFORM_ATTR` blocks):

        parallel(tiles · channel tiles) · unrolled(positions in a tile) · vector(channels)

    Unrolling the positions resolves the bodies' selects to one constant combination per copy. The
    input transform's pad is inlined and its row stage computed per tile, in the same parallel loop;
    the conv's fused epilogue is inlined into the output transform, which writes the output directly
    (one parallel region per stage: on a shared 2-core machine each costs microseconds to start)."""

    def __init__(self, params: CpuParams):
        self.params = params

    def apply(self, func, target, tunable):
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        marked = [i for i, b in enumerate(blocks) if TRANSFORM_ATTR in sch.get(b).annotations]
        if not marked or any(iv.iter_type != tirx.IterVar.DataPar for b in blocks for iv in sch.get(b).iter_vars):
            return None
        main = blocks[marked[-1]]
        names = [sch.get(b).name_hint for b in blocks]
        producers = [b for i, b in enumerate(blocks) if i < marked[0]]
        consumers = [sch.get_sblock(n) for n in names[marked[-1] + 1:]]
        inner = [sch.get_sblock(names[i]) for i in marked[:-1]]
        for b in consumers[:-1]:  # the epilogue (bias, residual add, activation), into the transform
            sch.compute_inline(b)
        if consumers:
            sch.reverse_compute_inline(consumers[-1])
        for b in producers:  # the pad: a select in the row stage's loads
            sch.compute_inline(b)
        main = sch.get_sblock(names[marked[-1]])
        mark = int(sch.get(main).annotations[TRANSFORM_ATTR])
        loops = sch.get_loops(main)
        if len(loops) != 4:
            return None
        if mark < 0:  # output coordinates: (n, y, x, k) -> (n, y/m, x/m, k tiles, y%m, x%m, k)
            y_o, y_i = sch.split(loops[1], [None, -mark])
            x_o, x_i = sch.split(loops[2], [None, -mark])
            tiles, positions = [loops[0], y_o, x_o], [y_i, x_i]
        else:  # the input transform (tile, i, j, c): columns j outermost, so the row stage T[:, j]
            positions = [loops[mark + 1], loops[mark]]  # one column needs fits on the stack (≤ 1 KiB)
            tiles = [lp for i, lp in enumerate(loops[:3]) if i not in (mark, mark + 1)]
        c_o, c_i = self._split_channels(sch, loops[3])
        sch.reorder(*tiles, c_o, *positions, c_i)
        sch.parallel(sch.fuse(*tiles, c_o))
        for lp in positions:
            sch.unroll(lp)
        if _loop_extent(sch, c_i) > 1:
            sch.vectorize(c_i)
        for b in inner:  # the input transform's row stage, per tile and column (kept in registers)
            sch.compute_at(b, positions[0], preserve_unit_loops=True)
            own = sch.get_loops(b)[2:]
            for lp in own[:-1]:
                sch.unroll(lp)
            if (_loop_extent(sch, own[-1]) or 1) > 1:
                sch.vectorize(own[-1])
        return sch

    def _split_channels(self, sch: s_tir.Schedule, loop):
        lanes, channels = self.params.lanes, _loop_extent(sch, loop) or 1
        vector = next((t for t in (2 * lanes, lanes, lanes // 2, lanes // 4) if t >= 2 and channels % t == 0), 1)
        return sch.split(loop, [None, vector])


# int32 accumulator vectors a `GroupedInt8` tile may hold: with the unrolled taps' weight vectors and the
# int16 products beside them, 16 of NEON's 32 q registers (more spilled on a 64-channel depthwise 3×3)
_GROUPED_ACCUMULATORS = 16


class GroupedInt8(dlight.ScheduleRule):
    """Schedules a PrimFunc built around the `GROUPED_ATTR` compute of `int8.legalize_grouped_conv2d`
    (grouped / depthwise int8 conv, with fused prologue and epilogue):

        parallel(rows · pixel tiles) · channel vectors · unrolled(tap pairs · pixels) · vector(channels)

    The whole reduction and a tile of one row's pixels are unrolled, so neighbouring pixels share the
    input vectors of their common taps (stride 1) and the accumulators stay in registers; the epilogue
    (bias, requantize, activation) is applied per tile while it is hot."""

    def __init__(self, params: CpuParams):
        self.params = params

    def apply(self, func, target, tunable):
        sch = s_tir.Schedule(func)
        annotated = _annotated_reduction(sch, GROUPED_ATTR)
        if annotated is None:
            return None
        infos, idx = annotated
        main, producers, consumers = infos[idx].block_rv, infos[:idx], infos[idx + 1:]
        kinds = infos[idx].dom_kind()
        n_s = len(kinds) - len(kinds.lstrip("S"))
        loops = sch.get_loops(main)
        spatial, reduce = loops[:n_s], loops[n_s:]
        p = self.params
        f_tile = int(sch.get(main).annotations[GROUPED_ATTR])
        fo, fi = sch.split(spatial[-1], [None, f_tile])
        if len(spatial) >= 2:  # pixels of one row per tile: as many as the accumulator budget allows
            width = _loop_extent(sch, spatial[-2])
            xo, xi = sch.split(spatial[-2], [None, _largest_divisor(width, _GROUPED_ACCUMULATORS * p.lanes // f_tile)])
            outer, tile = spatial[:-2] + [xo], [xi]
        else:
            outer, tile = [], []
        sch.reorder(*outer, fo, *reduce, *tile, fi)
        if outer:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        _tile_epilogue(sch, main, [c.block_rv for c in consumers], fo, p.lanes, staged=p.sqrdmulh,
                       serial_below=_SERIAL_PROLOGUE_BYTES)
        for lp in [*reduce, *tile]:
            sch.unroll(lp)
        sch.vectorize(fi)  # before decompose_reduction: TVM only vectorizes blocks that keep their init
        sch.decompose_reduction(main, reduce[0])
        for b in producers:  # channel / spatial padding: a select in the vector loads
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001  TVM refused: the producer keeps its own loop nest
                schedule_spatial(sch, b.block_rv, p.lanes)
        return sch


# int32 accumulator vectors of a `DepthwiseDot` tile: beside them the tile's 3 × 4 weight vectors and the
# re-laid columns its pixels read
_DEPTHWISE_ACCUMULATORS = 16


class DepthwiseDot(dlight.ScheduleRule):
    """Schedules a PrimFunc built around the `DEPTHWISE_ATTR` compute of `int8.legalize_depthwise_dot`
    (with fused prologue and epilogue):

        [parallel(output rows) · columns · 16-channel calls · re-layout (`intrin_depthwise.COLUMNS`: one ``st4``)]
        parallel(output rows) · pixel tiles · 16-channel tiles · unrolled(kx · pixels · 4-channel vectors)
            · sdot(4 channels × 4 taps)

    The re-layout is a stage here where the channels are not whole 16-channel calls (else a kernel of its
    own, `intrin_depthwise.padded_columns`, whose output this PrimFunc reads): written once, for all rows,
    before the convolution reads it — re-laid per output row under the convolution's parallel loop it cost
    a workspace allocation per row (64-channel 16×16 on arm-a55: 57.9k instructions against 53.7k).
    A tile's accumulators (4 pixels × 16 channels, measured against 2–16 pixels × 4–16 channels and channel
    tiles outermost) stay in registers over the 3 kx taps, and the epilogue (bias, requantize, activation)
    is applied per tile while it is hot."""

    def __init__(self, params: CpuParams):
        self.params = params

    def apply(self, func, target, tunable):
        sch = s_tir.Schedule(func)
        annotated = _annotated_reduction(sch, DEPTHWISE_ATTR)
        if annotated is None:
            return None
        infos, idx = annotated
        main, consumers = infos[idx].block_rv, infos[idx + 1:]
        # the re-layout: a stage here, or a kernel of its own (`intrin_depthwise.padded_columns`)
        columns = next((b.block_rv for b in infos[:idx] if sch.get(b.block_rv).name_hint == COLUMNS_NAME), None)
        others = [b.block_rv for b in infos[:idx] if sch.get(b.block_rv).name_hint != COLUMNS_NAME]
        loops = sch.get_loops(main)  # ([n,] y, x, channels, kx, taps): normalization drops a unit batch
        if len(loops) not in (5, 6):
            return None
        *rows, x, ch, rx, rk = loops
        p = self.params
        lanes, calls = intrin_depthwise.LANES, intrin_depthwise.CHANNELS // intrin_depthwise.LANES
        width = _loop_extent(sch, x)
        pixels = _largest_divisor(width, _DEPTHWISE_ACCUMULATORS // calls)
        xo, xi = sch.split(x, [None, pixels])
        co, cv, ci = sch.split(ch, [None, calls, lanes])
        sch.reorder(*rows, xo, co, rx, xi, cv, ci, rk)
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        sch.parallel(row)
        if columns is not None:
            c_loops = sch.get_loops(columns)  # ([n,] y, columns, channels, taps)
            size = _written_bytes(sch, columns)
            if size is None or size >= _SERIAL_PROLOGUE_BYTES:
                sch.parallel(sch.fuse(*c_loops[:-3]) if len(c_loops) > 4 else c_loops[0])
            _, c_all, _ = sch.get_loops(columns)[-3:]
            _, c_in = sch.split(c_all, [None, intrin_depthwise.CHANNELS])
        _tile_epilogue(sch, main, [c.block_rv for c in consumers], co, p.lanes, staged=p.sqrdmulh,
                       serial_below=_SERIAL_PROLOGUE_BYTES)
        init = sch.decompose_reduction(main, rx)
        sch.vectorize(sch.get_loops(init)[-1])
        for lp in (rx, xi, cv):
            sch.unroll(lp)
        intrin_depthwise.register()
        sch.tensorize(ci, intrin_depthwise.TAPS)
        if columns is not None:
            sch.tensorize(c_in, intrin_depthwise.COLUMNS)
        for block in others:  # channel / spatial padding: its own loop nest (the re-layout reads whole rows)
            schedule_spatial(sch, block, p.lanes, serial_below=_SERIAL_PROLOGUE_BYTES)
        return sch


# pixels of one row a `DepthwiseDsp` tile accumulates at stride 1 (4 int32 sums each, in general registers;
# their windows share columns); strided convs take 1. Measured on cortex-m4 mobilenet_blocks' depthwise convs
# (64 ch 16×16, 64 ch stride 2, 96 ch 8×8), channel tiles outside the pixel tiles: 1 pixel 465.5k / 120.2k /
# 181.0k, 2 pixels 426.2k / 135.0k / 161.4k, 4 pixels 481.2k / 143.4k / 187.7k (spills); the pixel tiles
# outside the channel tiles 1–11 % more at 1 and 2 pixels, except stride 2 with 2 pixels (122.6k)
_DSP_DEPTHWISE_PIXELS = 2


def _column_stride(block: tirx.SBlock, var) -> int | None:
    """The stride of the NHWC input column `block` reads per step of its output column `var` (the first
    4-D read whose third index moves with `var`; the packed weights' do not), None if none does."""
    for read in block.reads:
        if len(read.region) == 4:
            coeffs = tvm.sym.detect_linear_equation(read.region[2].min, [var])
            if len(coeffs) == 2 and _int(coeffs[0]) != 0:
                return _int(coeffs[0])
    return None


class DepthwiseDsp(dlight.ScheduleRule):
    """Schedules a PrimFunc built around the `DEPTHWISE_DSP_ATTR` compute of `int8.legalize_depthwise_dsp`
    (with fused prologue and epilogue):

        [n ·] rows · 4-channel calls · pixel tiles · unrolled(ky · kx · pixels) · DSP intrinsic (4 channels × 1 tap)

    The whole window is unrolled, so each tap's activation word and weights are loaded once per tile (the
    tile's pixels share the weights and, at stride 1, the columns their windows overlap on) and the
    accumulators stay in registers; the epilogue (bias, requantize, activation) is applied per tile while
    it is hot. A prologue (spatial or channel padding) keeps a loop nest of its own."""

    def __init__(self, params: CpuParams):
        self.params = params

    def apply(self, func, target, tunable):
        sch = s_tir.Schedule(func)
        annotated = _annotated_reduction(sch, DEPTHWISE_DSP_ATTR)
        if annotated is None:
            return None
        infos, idx = annotated
        main, producers, consumers = infos[idx].block_rv, infos[:idx], infos[idx + 1:]
        kernel = by_intrin(intrin_dsp_depthwise.KERNELS, str(sch.get(main).annotations[DEPTHWISE_DSP_ATTR]))
        if kernel is None:
            return None
        kinds = infos[idx].dom_kind()
        n_s = len(kinds) - len(kinds.lstrip("S"))
        loops = sch.get_loops(main)  # ([n,] [y,] [x,] channels, [ky,] [kx]): normalization drops unit loops
        *outer, ch = loops[:n_s]
        reduce, tile = loops[n_s:], []
        if _int(sch.get(main).writes[0].source.shape[2]) > 1:  # a pixel tile along the output row
            stride = _column_stride(sch.get(main), infos[idx].iters[n_s - 2].var)
            pixels = _DSP_DEPTHWISE_PIXELS if stride == 1 else 1
            xo, xi = sch.split(outer[-1], [None, _largest_divisor(_loop_extent(sch, outer[-1]), pixels)])
            outer, tile = outer[:-1] + [xo], [xi]
        co, ci = sch.split(ch, [None, kernel.lanes])
        sch.reorder(*outer[:-1], co, *outer[-1:], *reduce, *tile, ci)
        _tile_epilogue(sch, main, [c.block_rv for c in consumers], (outer or [co])[-1], self.params.lanes)
        sch.decompose_reduction(main, reduce[0])
        for lp in [*reduce, *tile]:
            sch.unroll(lp)
        kernel.ensure_registered()
        sch.tensorize(ci, kernel.intrin)
        for b in producers:  # the padded input: its own loop nest (the intrinsic loads words of it)
            schedule_spatial(sch, b.block_rv, self.params.lanes)
        return sch


@dataclass(frozen=True)
class DotTile:
    """One schedule of a tensorized dot kernel: its accumulator tile — `pixels` (pixel pairs for a
    2-pixel kernel) × `vectors` channel tiles of the kernel's lanes — and whether the pixel tiles
    (else the channel tiles) are the outer, parallel loop."""

    pixels: int
    vectors: int
    pixel_outer: bool


@dataclass
class _DotPlan:
    """What `TensorizedDot` knows about a kernel once its channel and reduction axes are split."""

    kernel: DotKernel
    main: object
    producers: list
    consumers: list
    reduce: list  # reduction loops, the last split by the kernel's depth: [..., r_o, r_i]
    calls: list  # the loops the intrinsic covers
    rows: list  # spatial loops outside the intrinsic, the last tiled by `DotTile.pixels`
    f_o: object  # channel tiles
    width: int  # extent of rows[-1] (1 without rows)
    outer_rows: int  # iterations of rows[:-1]
    channel_tiles: int  # extent of f_o
    budget: int  # accumulator vectors a tile may hold
    loads: tuple[int, int]  # vector loads of activations and weights per intrinsic call
    weight_bytes: int  # weights one channel tile reads over the whole reduction


class TensorizedDot(dlight.ScheduleRule):
    """Schedules a PrimFunc built around one compute annotated with `DOT_ATTR` (with fused prologue and epilogue):

        parallel(outer pixels [, channel tiles]) · channel tiles · KH · KW · C/depth
            · unrolled(pixels × channel vectors) · intrinsic(lanes × depth)

    (a 2-pixel kernel's tile counts pixel pairs, its intrinsic covers a 2 × 2 block, `int8.mmla_desc`).

    The accumulator tile (≤ `DotKernel.accumulators` vectors, ≤ 1 KiB so it stays on the stack and
    in registers) is initialised, accumulated over the whole reduction, then the epilogue
    (correction, bias, requantize, activation) is applied to it and written once. `apply` picks the
    tile by a load-count model (`default_tile`); `tiles` lists every valid one for tuning
    (`graphopt.tune` measures them as the kernel's design spaces). `l1d_bytes`: the core's L1 data
    cache, for the model's charge on weight tiles that do not fit it (`_tile_cost`);
    `channels_outer_on_ties`: `CpuParams.channels_outer_on_ties`."""

    def __init__(self, kernels: tuple[DotKernel, ...], cores: int, lanes: int, staged: bool = False,
                 l1d_bytes: int | None = None, channels_outer_on_ties: bool = False):
        self.kernels, self.cores, self.lanes, self.staged = kernels, cores, lanes, staged  # `_tile_epilogue`
        self.l1d_bytes, self.channels_outer_on_ties = l1d_bytes, channels_outer_on_ties

    def apply(self, func, target, tunable):
        sch = s_tir.Schedule(func)
        plan = self._plan(sch)
        return None if plan is None else self._schedule(sch, plan, self.default_tile(plan))

    def tiles(self, func) -> list[DotTile]:
        """Every tile `schedule` accepts for `func` (empty if this rule does not take it), the
        default first, then by the load-count model."""
        plan = self._plan(s_tir.Schedule(func))
        if plan is None:
            return []
        default = self.default_tile(plan)
        options = [DotTile(p, v, outer) for p, v in _tile_options(plan.width, plan.channel_tiles, plan.budget)
                   for outer in ((True, False) if plan.rows else (default.pixel_outer,))]
        options.sort(key=lambda t: self._cost(plan, (t.pixels, t.vectors)))
        return [default] + [t for t in options if t != default]

    def schedule(self, sch: s_tir.Schedule, tile: DotTile) -> s_tir.Schedule:
        """Schedule the PrimFunc of `sch` (its ``main``) with `tile`, one of `tiles`; returns `sch`."""
        plan = self._plan(sch)
        if plan is None:
            raise ValueError("not a tensorized dot kernel of this target")
        return self._schedule(sch, plan, tile)

    def _plan(self, sch: s_tir.Schedule) -> _DotPlan | None:
        annotated = _annotated_reduction(sch, DOT_ATTR)
        if annotated is None:
            return None
        infos, idx = annotated
        k = by_intrin(self.kernels, str(sch.get(infos[idx].block_rv).annotations[DOT_ATTR]))
        if k is None:
            return None
        main = infos[idx].block_rv
        loops = sch.get_loops(main)
        kinds = infos[idx].dom_kind()
        n_s = len(kinds) - len(kinds.lstrip("S"))
        spatial, reduce = loops[:n_s], loops[n_s:]
        if k.pixels == 1:
            f_o, f_i = sch.split(spatial[-1], [None, k.lanes])
            calls, rows = [f_i], spatial[:-1]  # e.g. (n, y, x): the tile spans `px` pixels of the innermost one
        else:  # (…, pixel pairs, channel pairs, 2 pixels, 2 channels): `int8.mmla_desc`'s blocks
            dims = _loops_by_dim(sch, main, loops)  # normalization dropped the loops of unit extent
            calls, rows = dims[-2:], [lp for lp in dims[:-3] if lp is not None]
            f_o = dims[-3] if dims[-3] is not None else sch.add_unit_loop(calls[0])
        r_o, r_i = sch.split(reduce[-1], [None, k.depth])
        vector_bytes = 4 * self.lanes  # loads per call: activations (pixels × depth int8), weights (lanes × depth)
        loads = (k.pixels * -(-k.depth // vector_bytes),
                 -(-k.lanes * k.depth * np.dtype(k.weight_dtype).itemsize // vector_bytes))
        found = [_loop_extent(sch, lp) for lp in [*rows, f_o, *reduce[:-1], r_o, r_i]]
        if any(e is None for e in found):  # a dynamic extent: no static tile
            return None
        extents = [int(e or 0) for e in found]
        *row_extents, channel_tiles = extents[:len(rows) + 1]
        weight_bytes = int(np.prod(extents[len(rows) + 1:])) * k.lanes * np.dtype(k.weight_dtype).itemsize
        return _DotPlan(k, main, infos[:idx], infos[idx + 1:], reduce[:-1] + [r_o, r_i], calls, rows, f_o,
                        row_extents[-1] if rows else 1, int(np.prod(row_extents[:-1])), channel_tiles,
                        min(k.accumulators, (_STACK_BYTES - 1) // (4 * k.lanes * k.pixels)), loads, weight_bytes)

    def _cost(self, plan: _DotPlan, pv: tuple[int, int]) -> tuple[float, int]:
        """`_tile_cost` of tile `pv`, its weight loads from L2 when its weights do not fit L1, none when
        they stay in registers (`_weights_in_registers`)."""
        far = self.l1d_bytes is not None and pv[1] * plan.weight_bytes > self.l1d_bytes
        loads = (plan.loads[0], 0) if self._weights_in_registers(plan, pv[1]) else plan.loads
        return _tile_cost(pv, loads, far)

    def _weights_in_registers(self, plan: _DotPlan, vectors: int) -> bool:
        """Whether a tile of `vectors` channel vectors keeps its weights in registers across the pixel tiles
        (channel tiles outermost): the whole reduction one intrinsic call (e.g. a 1×1 conv from 16 channels)
        and at most `_REGISTER_WEIGHT_BYTES` of weights, on `sdot`/`smmla` kernels of targets without a known L1
        (arm-a53's NEON kernel lost: depthwise_concat int8 792k → 805k; arm-a55 409.1k → 405.8k, arm-a76 411.7k →
        407.3k):
        depthwise_concat's 16→64 expand at 16×16, 2 pixels × 4 vectors 38,598 instructions against 40,318
        for the 4 × 2 the load count picks otherwise (with 64-deep reductions, 16 weight registers beside 8
        accumulators and 8 pixels' activations spill: the 64→16 projection 49,288 at 8 × 1 against 42,920)."""
        k = plan.kernel
        single_call = plan.weight_bytes == k.depth * k.lanes * np.dtype(k.weight_dtype).itemsize
        return self.l1d_bytes is None and k.feature in (Feature.DOTPROD, Feature.I8MM) and single_call \
            and vectors * plan.weight_bytes <= _REGISTER_WEIGHT_BYTES

    def default_tile(self, plan: _DotPlan) -> DotTile:
        """The cheapest operand loads per call (`_cost`); pixel tiles outermost when they
        keep every core busy and re-stream less than channel tiles outermost would — pixel tiles
        outermost re-stream the weights once per pixel tile, channel tiles outermost the input once
        per channel tile (e.g. 7×7×512 layers). Where both re-stream alike (e.g. one channel tile), the
        pixel tiles go outermost unless `channels_outer_on_ties`. With a known L1 (`l1d_bytes`), pixel tiles
        go outermost whenever all the weights fit in half of it: channel tiles outermost would give the
        cores different channel tiles of the same pixels, writing neighbouring bytes of shared cache lines
        (MobileNetV2's int8 16→96 1×1 conv at 112², 48 channels per tile: 579 µs in the model against
        ~72 µs, the model 0.75× end to end on 2 threads; ResNet-18 1.01×, ResNet-20 0.98-1.00×)."""
        options = _tile_options(plan.width, plan.channel_tiles, plan.budget)
        px, unroll = min(options, key=lambda pv: self._cost(plan, pv))
        pixel_tiles = plan.outer_rows * plan.width // px
        pixels, channels = plan.outer_rows * plan.width * plan.kernel.pixels, plan.channel_tiles * plan.kernel.lanes
        restream = (pixel_tiles * channels, plan.channel_tiles // unroll * pixels)  # pixel / channel tiles outer
        cheaper = restream[0] < restream[1] if self.channels_outer_on_ties else restream[0] <= restream[1]
        if self.l1d_bytes is not None and plan.channel_tiles // unroll > 1 \
                and plan.weight_bytes * plan.channel_tiles <= self.l1d_bytes // 2:
            cheaper = True  # re-streaming weights that stay in L1 is free; splitting pixels across cores is not
        if self._weights_in_registers(plan, unroll):
            cheaper = False  # channel tiles outermost: the weights stay in registers over the pixel tiles
        return DotTile(px, unroll, bool(plan.rows) and pixel_tiles >= self.cores and cheaper)

    def _schedule(self, sch: s_tir.Schedule, plan: _DotPlan, tile: DotTile) -> s_tir.Schedule:
        k, main, reduce = plan.kernel, plan.main, plan.reduce
        f_oo, f_u = sch.split(plan.f_o, [None, tile.vectors])
        if plan.rows:
            p_o, p_i = sch.split(plan.rows[-1], [None, tile.pixels])
            outer, unrolled = plan.rows[:-1] + [p_o], [p_i, f_u]
        else:
            outer, unrolled = [], [f_u]
        tiles = outer + [f_oo] if tile.pixel_outer else [f_oo] + outer
        sch.reorder(*tiles, *reduce[:-1], *unrolled, *plan.calls, reduce[-1])
        tile_loop = tiles[-1]
        if len(tiles) > 1:
            sch.parallel(sch.fuse(*tiles[:-1]) if len(tiles) > 2 else tiles[0])

        # a 2-pixel kernel's blocks are read back in the output's shape (its `int8._finish`)
        consumers = plan.consumers
        shape = [_int(d) for d in sch.get(consumers[0].block_rv).writes[0].source.shape] if k.pixels > 1 else None
        _tile_epilogue(sch, main, [c.block_rv for c in consumers], tile_loop, self.lanes, shape, self.staged,
                       _SERIAL_PROLOGUE_BYTES)

        init = sch.decompose_reduction(main, reduce[0])
        sch.vectorize(sch.get_loops(init)[-1])
        for lp in unrolled:
            sch.unroll(lp)
        k.ensure_registered()  # first use in the process: parses its TVMScript
        sch.tensorize(plan.calls[0], k.intrin)

        # prologue: padding / channel padding / +128 inlined into one materialised input copy
        for b in plan.producers[:-1]:
            sch.compute_inline(b.block_rv)
        if plan.producers:
            schedule_spatial(sch, plan.producers[-1].block_rv, self.lanes * 4,  # int8 data: 4× the fp32 lanes
                             serial_below=_SERIAL_PROLOGUE_BYTES)
        return sch


def _loops_by_dim(sch: s_tir.Schedule, block, loops: list) -> list:
    """Per axis of the buffer `block` writes, the loop its index iterates (None for a constant index)."""
    iters = [iv.var for iv in sch.get(block).iter_vars]
    return [next((loops[j] for j, v in enumerate(iters) if v.same_as(r.min)), None)
            for r in sch.get(block).writes[0].region]


# Weights a dot tile may keep in vector registers across its pixel tiles (16 NEON q registers)
_REGISTER_WEIGHT_BYTES = 256

# What a weight load streamed from L2 costs against one from L1, in `_tile_cost`. Measured on the x86
# host's VNNI kernel (48 KiB L1d), 3×3 int8 convs, 1 thread: 256 ch at 14×14 ran 371 µs with the tile
# the load count alone picks (2 pixels × 8 vectors: 288 KiB of weights re-read per pixel pair) against
# 248 µs at 7 × 2; with this charge the model picks the fastest or a tile within 3 % of it at
# 64 ch 56×56, 128 ch 28×28, 256 ch 14×14 and 512 ch 7×7.
_L2_LOAD_COST = 3


def _tile_cost(pv: tuple[int, int], loads: tuple[int, int], far: bool = False) -> tuple[float, int]:
    """Operand loads per intrinsic call of a (pixels, vectors) accumulator tile — (pixels·a +
    vectors·b) / (pixels·vectors) with `loads` = (a, b) vector loads of activations and weights per
    call, the weight loads counted `_L2_LOAD_COST` times when `far` (the tile's weights do not fit L1)
    — then the most accumulators first (7×2 beats 1×16 on a 7×7 map; a kernel reading 4 weight vectors
    per call prefers more pixels)."""
    (p, v), (a, b) = pv, loads
    return (p * a + v * b * (_L2_LOAD_COST if far else 1)) / (p * v), -p * v


def _tile_options(pixels: int, vectors: int, budget: int) -> list[tuple[int, int]]:
    """(pixels, channel vectors) dividing their axes with at most `budget` vectors in all."""
    return [(p, v) for p in range(1, min(pixels, budget) + 1) if pixels % p == 0
            for v in range(1, min(vectors, budget // p) + 1) if vectors % v == 0]


def _parallel_extent(sch: s_tir.Schedule, tiles: list) -> int:
    """Iterations of the loop `ChannelLastReduction` parallelizes (all tile loops but the last)."""
    extent = 1
    for loop in tiles[:-1] or tiles:
        extent *= _loop_extent(sch, loop) or 1 << 16
    return extent


def _read_along(sch: s_tir.Schedule, consumer, producer, var) -> bool:
    """Whether `consumer` reads what `producer` writes with `var` indexing the innermost dimension."""
    written = sch.get(producer).writes[0].source
    return any(r.source.same_as(written) and r.region[-1].min.same_as(var) for r in sch.get(consumer).reads)


class Injective(dlight.ScheduleRule):
    """Only spatial blocks (elementwise, broadcast, transpose, pad, reshape): inline them into as
    few loop nests as possible, then parallelize and vectorize each."""

    def __init__(self, params: CpuParams):
        self.params = params

    def apply(self, func, target, tunable):
        sch = s_tir.Schedule(func)
        infos = dlight.analysis.normalize_prim_func(sch)
        if infos is None or not all(b.is_injective() for b in infos):
            return None
        left, copied = _inline_without_nested_copies(sch, [b.block_rv for b in infos])
        for block in reversed(left):  # consumers first: a block kept from copying, read elementwise by
            consumers = sch.get_consumers(block)  # its one consumer, is computed a vector at a time
            if sch.get(block).name_hint in copied and len(consumers) == 1 and _elementwise(sch, consumers[0], block):
                try:
                    sch.compute_at(block, sch.get_loops(consumers[0])[-2], preserve_unit_loops=True)
                except Exception:  # noqa: BLE001  TVM refused: the block keeps its own loop nest
                    schedule_spatial(sch, block, self.params.lanes)
                else:
                    _try(lambda: _vectorize_innermost(sch, sch.get_loops(block)[-1], self._lanes(sch, block)))  # noqa: B023  called at once
            else:
                schedule_spatial(sch, block, self._lanes(sch, block))
        return sch

    def _lanes(self, sch: s_tir.Schedule, block) -> int:
        """Vector lanes for what `block` writes: the fp32 lanes, twice as many for 8- and 16-bit data, whose
        vectorized loops (two vectors of the lanes, `_vectorize_innermost`) then fill 16-byte registers (an
        int8 channel concat on arm-a55, 8×8×(16+16): 1,260 instructions in 8-byte vectors, 1,148 in 16-byte ones)."""
        dtype = str(sch.get(block).writes[0].source.dtype)
        return self.params.lanes * (2 if dtype in ("int8", "uint8", "int16", "uint16") else 1)


def _elementwise(sch: s_tir.Schedule, consumer, producer) -> bool:
    """Whether `consumer` (already scheduled: more than one loop) reads what `producer` writes only at
    its own iteration point (so computing `producer` under the consumer's loops covers it exactly)."""
    block, written = sch.get(consumer), sch.get(producer).writes[0].source
    regions = [r.region for r in block.reads if r.source.same_as(written)]
    if len(sch.get_loops(consumer)) < 2 or len(regions) != 1 or any(_int(r.extent) != 1 for r in regions[0]):
        return False
    indices = [r.min for r in regions[0] if _int(r.min) != 0]  # unit axes (e.g. the batch) read at 0
    return len(indices) == len(block.iter_vars) and all(i.same_as(v.var)
                                                        for i, v in zip(indices, block.iter_vars, strict=True))


def _loads(sch: s_tir.Schedule, consumer, producer) -> int:
    """How many times the body of `consumer` reads the buffer `producer` writes."""
    written, count = sch.get(producer).writes[0].source, [0]
    tvm_ffi.structural_walk(sch.get(consumer).body, (tvm.ir.TensorLoad, lambda load: count.__setitem__(
        0, count[0] + load.source.same_as(written))))
    return count[0]


# Levels of copies within copies an inlined spatial expression may hold: a requantize reads its
# fixed-point ``high`` term three times, so each chained requantization inlined whole triples the
# expression: an int8 concat of slices of concats compiled for over 15 minutes (46 s with this limit).
_NESTED_COPIES = 1


class _TooManyCopies(Exception):
    """Inlining the block would copy an expression that already holds copies."""


def _inline_without_nested_copies(sch: s_tir.Schedule, blocks: list) -> tuple[list, set[str]]:
    """Inline spatial blocks into each other as dlight's ``try_inline`` does (compute_inline while one
    succeeds, then reverse_compute_inline), except that a block read several times is not inlined
    once its expression holds `_NESTED_COPIES` levels of such copies. Returns the blocks left and
    the names of those kept for that reason."""
    nesting = {sch.get(b).name_hint: 0 for b in blocks}  # block name -> levels of copies its body holds

    kept: set[str] = set()  # blocks not inlined for that reason

    def inlined(name: str, uses: int) -> int:
        """The nesting of a block's expression once copied into a consumer `uses` times."""
        if uses > 1 and nesting[name] >= _NESTED_COPIES:
            kept.add(name)
            raise _TooManyCopies
        return nesting[name] + (uses > 1)

    def compute_inline(block) -> bool:
        name = sch.get(block).name_hint
        uses = {sch.get(c).name_hint: _loads(sch, c, block) for c in sch.get_consumers(block)}
        depth = inlined(name, sum(uses.values()))
        sch.compute_inline(block)
        for consumer in uses:
            nesting[consumer] = max(nesting[consumer], depth)
        return True

    def reverse_compute_inline(block) -> bool:
        name = sch.get(block).name_hint
        depths = {sch.get(p).name_hint: inlined(sch.get(p).name_hint, _loads(sch, block, p))
                  for p in sch.get_producers(block)}
        sch.reverse_compute_inline(block)
        for producer, depth in depths.items():
            nesting[producer] = max(nesting[name], depth)
        return True

    def first(step) -> int | None:
        for i, block in enumerate(blocks):
            try:
                if step(block):
                    return i
            except Exception:  # noqa: BLE001  TVM refused, or _TooManyCopies: the block stays
                continue
        return None

    while (i := first(compute_inline)) is not None or (i := first(reverse_compute_inline)) is not None:
        blocks.pop(i)
    return blocks, kept


class Generic(dlight.ScheduleRule):
    """Safe schedule for anything: per block, parallelize the leading spatial loops and vectorize
    the innermost loop when it is spatial; each step is skipped if TVM rejects it."""

    def __init__(self, params: CpuParams):
        self.params = params

    def apply(self, func, target, tunable):
        sch = s_tir.Schedule(func)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            kinds = dlight.analysis.get_sblock_info(sch, block).dom_kind()
            n_s = len(kinds) - len(kinds.lstrip("S"))
            loops = sch.get_loops(block)
            if len(loops) != len(kinds):
                continue
            if n_s == len(loops):
                _try(lambda: schedule_spatial(sch, block, self.params.lanes))  # noqa: B023  called at once
            elif n_s > 0:
                _try(lambda: sch.parallel(sch.fuse(*loops[:n_s])))  # noqa: B023  called at once
        return sch


def _try(step) -> None:
    try:
        step()
    except Exception:  # noqa: BLE001  TVM rejected this step; the PrimFunc stays correct without it
        pass


def default_rules(params: CpuParams) -> list[tuple[str, dlight.ScheduleRule]]:
    """The rules, in priority order, as (name reported in stats, rule)."""
    tensorized = [("tensorized_dot", _tensorized_dot(params))] if params.dots else []
    grouped = [("grouped_int8", GroupedInt8(params))] if params.int8_pairs else []
    depthwise = [("depthwise_dot", DepthwiseDot(params))] if params.depthwise_dot else []
    depthwise += [("depthwise_dsp", DepthwiseDsp(params))] if params.depthwise_dsp else []
    winograd = [("winograd_transform", WinogradTransform(params))] if params.winograd else []
    return tensorized + depthwise + grouped + winograd + [
        ("channel_last_reduction", ChannelLastReduction(params)),  # conv/depthwise/pool/dense/mean
        ("row_reduction", dlight.cpu.Reduction()),  # softmax/layernorm: reduce the innermost axis
        ("injective", Injective(params)),  # elementwise/transpose/pad chains
    ]


def _tensorized_dot(params: CpuParams) -> TensorizedDot:
    return TensorizedDot(params.dots, params.cores, params.lanes, params.sqrdmulh, params.l1d_bytes,
                         params.channels_outer_on_ties)


def _dot_rule(spec: TargetSpec) -> TensorizedDot | None:
    params = CpuParams.from_spec(spec)
    return _tensorized_dot(params) if params.dots else None


def dot_tiles(func: tirx.PrimFunc, spec: TargetSpec) -> list[DotTile]:
    """Every `DotTile` `TensorizedDot` can schedule the tensorized dot kernel `func` with on `spec`
    (the default first, then by the load model); empty for any other kernel."""
    rule = _dot_rule(spec)
    return [] if rule is None else rule.tiles(func)


def dot_schedule(sch: s_tir.Schedule, spec: TargetSpec, tile: DotTile) -> s_tir.Schedule:
    """`sch` (a tensorized dot kernel of `spec`, unscheduled) scheduled with `tile`, one of `dot_tiles`."""
    rule = _dot_rule(spec)
    if rule is None:
        raise ValueError(f"{spec.name} has no dot kernels")
    return rule.schedule(sch, tile)


def schedule_module(mod: tvm.IRModule, spec: TargetSpec) -> tuple[tvm.IRModule, dict, list]:
    """Schedule every PrimFunc of `mod` for `spec`.

    Returns a copy of `mod` (`lane_conditions.uniform_lane_conditions` applied; on aarch64
    `fixed_point.use_sqrdmulh` and `narrowing.narrow_through_int16` too),
    ``{rule name: count}`` (``"fallback"`` for `Generic`, ``"tuned"`` for PrimFuncs already marked
    ``tirx.is_scheduled``, which are left as they are, ``"depthwise_columns"`` for the depthwise re-layout
    kernels, ``"quantize_nhwc"`` for `converters.quantize_channel_last`'s, ``"conv_patches"`` for
    `patches.patches`' window copies and ``"pad_rows"`` for `pad_rows.pad_nhwc`'s pads, all scheduled when
    written), and the names of PrimFuncs left as TVM emitted them.
    """
    params = CpuParams.from_spec(spec)
    target = spec.tvm()
    rules = default_rules(params) + [("fallback", Generic(params))]
    counts: dict[str, int] = {}
    unscheduled: list[str] = []
    with target:
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and intrin_depthwise.COLUMNS_ATTR in func.attrs:  # scheduled when written
                counts["depthwise_columns"] = counts.get("depthwise_columns", 0) + 1
                continue
            if func.attrs is not None and QUANTIZE_NHWC_ATTR in func.attrs:  # scheduled when written
                counts["quantize_nhwc"] = counts.get("quantize_nhwc", 0) + 1
                continue
            if func.attrs is not None and patches.PATCHES_ATTR in func.attrs:  # scheduled when written
                counts["conv_patches"] = counts.get("conv_patches", 0) + 1
                continue
            if func.attrs is not None and pad_rows.PAD_ATTR in func.attrs:  # scheduled when written
                counts["pad_rows"] = counts.get("pad_rows", 0) + 1
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:  # e.g. from a tuning database
                counts["tuned"] = counts.get("tuned", 0) + 1
                continue
            for name, rule in rules:
                try:
                    sch = rule.apply(func, target, False)
                except Exception:  # noqa: BLE001  a rule that cannot schedule this PrimFunc
                    sch = None
                if sch is not None:
                    mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                    counts[name] = counts.get(name, 0) + 1
                    break
            else:
                unscheduled.append(gv.name_hint)
    mod = uniform_lane_conditions(mod)
    if has_sqrdmulh(spec):
        mod = narrow_through_int16(use_sqrdmulh(mod))
    return mod, counts, unscheduled
