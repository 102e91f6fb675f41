"""Fold quantize/dequantize (QDQ) patterns into graphopt's integer operators (`graphopt.qops`).

Each ``quantize_per_tensor(v)`` whose float value ``v`` is computed from dequantized int8 values
becomes integer arithmetic ending in a fixed-point requantize (s = scale, z = zero point):

    q(act(conv(dq(x), dq(w), b)))  = requantize(qconv2d(x, zx, w, round(b / sx·sw)), M = sx·sw/so, zo, act range)
    q(act(linear(dq(x), dq(w), b)))= requantize(qlinear(...)) ;  q(matmul(dq(a), dq(b))) = requantize(qmatmul(...))
    q(act(add(dq(a), dq(b))))      = qadd(a, b)                          (TFLite: ≪20, rescale each, sum, rescale;
                                                                          a − b: b's multiplier negated)
    q(act(mul(dq(a), dq(b))))      = requantize(qmul(a, za, b, zb), M = sa·sb/so)   (squeeze-excite gates)
    q(act(batch_norm(dq(x))))      = requantize(qconv2d(x, zx, ±127, bias, groups=C), M_c = sx·|γ'_c|/(127·so))
                                     (a BN no conv absorbs: a per-channel integer affine, also x·c and x + c
                                      with a constant per-channel c)
    q(cat(dq(x_i)))                = cat(requantize(x_i, M = s_i/so))    (inputs already at (so, zo) pass through)
    q(maxpool / view-like(dq(x)))  = op(x), requantized if (sx, zx) ≠ (so, zo)
    q(pad(dq(x), v))               = pad(x, q(v)), requantized if needed  (0.0 pads with zo: exact)
    q(getitem(split(dq(x)), i))    = slice(x), requantized if needed     (chunk / split / split_with_sizes)
    q(avgpool(dq(x)))              = requantize(qsum_pool2d(x, zx), M = sx/(so·k))
    q(f(dq(x))), f elementwise     = qlut(x, table), table[i] = q(f(dq(i)))   (exact: same fp32 f as the QDQ form;
                                     activations, and add/sub/mul/div/pow with Python scalars)
    q(clamp(dq(x))), same params   = clamp(x, range)                     (standalone ReLU: the quantizer shares)
    q(dq(x))                       = requantize(x, M = sx/so)
    qsign(dq(x))  (binary act)     = qsign(x, zx)

``act`` (relu, relu6/hardtanh, clamp) is folded into the output range: q(relu(y)) = max(q(y), zo).
Weights of 4, 2 or 1 bits (read from the dequantize's quant range) are stored packed and
unpacked by `graphopt::unpack_bits`. Declined, with the reason, and left in QDQ form (which still
lowers): quantize nodes whose producer has no integer form here (e.g. softmax, layer norm, a
division of two tensors), non-constant weights, uint8 or non-8-bit quantize dtypes, float bias
that is not a constant, avg-pool options that change the divisor per window, uneven adaptive
pooling, and weight-only layers (int8 weights dequantized, fp32 compute). The pass counts the
float compute left between quantize and dequantize (``stats["float_ops"]``, by kind).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from graphopt import qops
from graphopt.passes._graph import add_constant, constant_of, delete_unused_attributes, is_op
from graphopt.passes.fold_batchnorm import bn_parts
from graphopt.passes.base import Decline, GraphPass, PassContext, PassResult, Property

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
Q_TENSOR = (qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor)
DQ_TENSOR = (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor)
DQ_CHANNEL = (qd.dequantize_per_channel.default,)
QSIGN = torch.ops.graphopt.quantize_sign.default
g = qops.ops

# activations that only narrow the output range (lo, hi in real units; None = unbounded)
CLAMPS = {
    aten.relu.default: lambda n: (0.0, None),
    aten.relu6.default: lambda n: (0.0, 6.0),
    aten.hardtanh.default: lambda n: (float(n.args[1]) if len(n.args) > 1 else -1.0,
                                      float(n.args[2]) if len(n.args) > 2 else 1.0),
    aten.clamp.default: lambda n: (None if len(n.args) < 2 or n.args[1] is None else float(n.args[1]),
                                   None if len(n.args) < 3 or n.args[2] is None else float(n.args[2])),
}
_UNARY = (aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.clamp.default, aten.hardswish.default,
          aten.hardsigmoid.default, aten.sigmoid.default, aten.tanh.default, aten.gelu.default,
          aten.silu.default, aten.elu.default, aten.leaky_relu.default, aten.mish.default, aten.softplus.default,
          aten.neg.default, aten.abs.default, aten.exp.default, aten.square.default)
# arithmetic that is elementwise in one tensor when its other operands are Python scalars (→ qlut)
_SCALAR_ARITHMETIC = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor,
                      aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.rsub.Scalar, aten.pow.Tensor_Scalar)
_VIEWS = (aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.permute.default,
          aten.squeeze.dims, aten.unsqueeze.default, aten.transpose.int, aten.contiguous.default,
          aten.clone.default, aten.slice.Tensor, aten._unsafe_view.default, aten.squeeze.dim, aten.t.default,
          aten.select.int)
PASS_THROUGH = (*_VIEWS, aten.max_pool2d.default)  # commute with (s, z): they share their input's params
PADS = (aten.pad.default, aten.constant_pad_nd.default)  # int8 data movement; the pad value quantized once
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)  # items are slices
BATCH_NORMS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
SHARES_PARAMS = (aten.relu.default,)  # standalone: the quantizer gives its output its input's params (a clamp)
# producers a following relu/relu6/hardtanh/clamp folds into (the quantizer quantizes after the pair)
FUSES_CLAMP = (aten.conv2d.default, aten.linear.default, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.matmul.default,
               aten.mm.default, aten.bmm.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
               aten.mean.dim, aten.cat.default, *BATCH_NORMS)


@dataclass(frozen=True)
class QParams:
    scale: torch.Tensor  # float64, 1 element per tensor or per channel
    zero_point: torch.Tensor  # int64
    axis: int | None  # None: per tensor
    qmin: int
    qmax: int

    @property
    def s(self) -> float:
        return float(self.scale[0])

    @property
    def z(self) -> int:
        return int(self.zero_point[0])

    def same(self, other: "QParams") -> bool:
        return self.axis is None and other.axis is None and self.s == other.s and self.z == other.z


class Unfoldable(Exception):
    """Why a pattern stays in QDQ form."""


def _scalar(gm, v, what: str):
    if isinstance(v, fx.Node):
        c = constant_of(gm, v)
        if c is None or c.numel() != 1:
            raise Unfoldable(f"{what} is computed at run time, not a constant")
        return c.item()
    return v


def _qparams(gm, node: fx.Node) -> QParams:
    """Quant params of a quantize/dequantize node; int8 storage only."""
    a = node.args
    if is_op(node, *DQ_CHANNEL):
        scales, zps = constant_of(gm, a[1]), constant_of(gm, a[2]) if a[2] is not None else None
        if scales is None or (a[2] is not None and zps is None):
            raise Unfoldable("per-channel scales or zero points are not constants")
        zps = torch.zeros_like(scales, dtype=torch.int64) if zps is None else zps.to(torch.int64)
        axis, qmin, qmax, dtype = a[3], a[4], a[5], a[6]
        scale = scales.to(torch.float64).reshape(-1)
        zp = zps.reshape(-1)
    else:
        scale = torch.tensor([float(_scalar(gm, a[1], "scale"))], dtype=torch.float64)
        zp = torch.tensor([int(_scalar(gm, a[2], "zero point"))], dtype=torch.int64)
        axis, qmin, qmax, dtype = None, a[3], a[4], a[5]
    if dtype != torch.int8:
        raise Unfoldable(f"{dtype} storage; graphopt's integer operators take int8")
    return QParams(scale, zp, axis, int(qmin), int(qmax))


def _dq_input(gm, n) -> tuple[fx.Node, QParams]:
    """(int8 value, params) of a per-tensor dequantize feeding an op."""
    if not is_op(n, *DQ_TENSOR):
        raise Unfoldable(f"input {getattr(n, 'name', n)} is not a dequantized int8 value")
    return n.args[0], _qparams(gm, n)


def _weight_bits(qp: QParams, w: torch.Tensor) -> int:
    if qp.qmin >= -1 and qp.qmax <= 1 and bool(((w == 1) | (w == -1)).all()):
        return 1
    for bits in (2, 4):
        if qp.qmin >= -(1 << (bits - 1)) and qp.qmax <= (1 << (bits - 1)) - 1:
            return bits
    return 8


def _range(out: QParams, lo: float | None, hi: float | None) -> tuple[int, int]:
    """Output clamp: the quant range narrowed by a folded activation, q(clamp(y, lo, hi))."""
    qmin, qmax = out.qmin, out.qmax
    if lo is not None:
        qmin = max(qmin, min(qmax, out.z + round(lo / out.s)))
    if hi is not None:
        qmax = min(qmax, max(qmin, out.z + round(hi / out.s)))
    return qmin, qmax


def _multipliers(reals, bounds=None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return qops.multiplier_tensors(reals, bounds)
    except ValueError as exc:  # a scale ratio beyond 32-bit fixed point
        raise Unfoldable(str(exc)) from None


class _Rewriter:
    """Emits integer nodes before the quantize node being folded."""

    def __init__(self, gm: fx.GraphModule, at: fx.Node, stats: dict):
        self.gm, self.at, self.stats = gm, at, stats
        self.created: list[fx.Node] = []

    def call(self, op, *args) -> fx.Node:
        with self.gm.graph.inserting_before(self.at):
            self.created.append(self.gm.graph.call_function(op, tuple(args)))
        return self.created[-1]

    def const(self, hint: str, value: torch.Tensor) -> fx.Node:
        self.created.append(add_constant(self.gm, f"{self.at.name}_{hint}", value, before=self.at))
        return self.created[-1]

    def rollback(self) -> None:
        for n in reversed(self.created):
            self.gm.graph.erase_node(n)
            if n.op == "get_attr":
                delattr(self.gm, n.target)

    def requantize(self, acc, in_zp: int, reals, axis: int, out: QParams, lo: int, hi: int, bound) -> fx.Node:
        """requantize(acc − in_zp) by ``reals`` (one, or one per channel along ``axis``); ``bound`` ≥
        |acc − in_zp| (one or per channel) lets a small accumulator round once (`qops.quantize_multiplier`)."""
        m, s = _multipliers(reals, bound)
        return self.call(g.requantize.default, acc, in_zp, self.const("mult", m), self.const("shift", s),
                         axis, out.z, lo, hi)

    def rescale(self, x, xq: QParams, out: QParams, lo: int, hi: int) -> fx.Node:
        """x at (sx, zx) → (so, zo) within [lo, hi]; nothing if already there."""
        if xq.same(out) and (lo, hi) == (out.qmin, out.qmax):
            return x
        if xq.same(out):
            return self.call(aten.clamp.default, x, lo, hi)
        return self.requantize(x, xq.z, [xq.s / out.s], 0, out, lo, hi, 255)

    def weight(self, gm, dq_w: fx.Node, w: torch.Tensor, qp: QParams) -> fx.Node:
        """The int weight node of ``w`` (the dequantize's own constant when unchanged); packs weights
        below 8 bits."""
        bits = _weight_bits(qp, w)
        self.stats["weight_bytes"] += (w.numel() * bits + 7) // 8
        self.stats["weight_bytes_fp32"] += w.numel() * 4
        if bits == 8:
            return dq_w.args[0] if w is constant_of(gm, dq_w.args[0]) else self.const("w", w)
        packed = self.const(f"w{bits}", qops.pack_bits(w, bits))
        self.stats[f"packed_int{bits}"] = self.stats.get(f"packed_int{bits}", 0) + 1
        return self.call(g.unpack_bits.default, packed, bits, list(w.shape))


def _weight_params(gm, dq_w: fx.Node, channels: int) -> tuple[torch.Tensor, QParams]:
    """(int values, per-output-channel params) of a dequantized constant weight."""
    if not is_op(dq_w, *DQ_TENSOR, *DQ_CHANNEL):
        raise Unfoldable("weight is not dequantized from int8 (float weight in a quantized layer)")
    qp = _qparams(gm, dq_w)
    w = constant_of(gm, dq_w.args[0])
    if w is None:
        raise Unfoldable("weight is not a constant")
    if qp.axis not in (None, 0):
        raise Unfoldable(f"weight quantized per channel along axis {qp.axis}; output channels are axis 0")
    if bool((qp.zero_point != 0).any()):
        raise Unfoldable("asymmetric weights (non-zero weight zero point)")
    if qp.axis is None:
        qp = QParams(qp.scale.expand(channels).clone(), qp.zero_point.expand(channels).clone(), 0, qp.qmin, qp.qmax)
    return w, qp


def _layer(r: _Rewriter, gm, dq_w: fx.Node, b, xq: QParams, out: QParams, channels: int):
    """(weight node, int32 bias node, multipliers M_c = sx·sw_c/so, |acc| bounds) of a conv/linear.

    The bias is rounded to the accumulator unit sx·sw_c. A channel whose bias does not fit int32 in
    that unit (its input was constant in calibration: a scale at the 1e-8 floor) while the input's
    whole contribution, 255·Σ|w_c|·sx·sw_c, stays below 1/32 of an output step, is its bias alone:
    zero weights, a unit of |b_c|/2^30."""
    w, qp = _weight_params(gm, dq_w, channels)
    unit = xq.s * qp.scale
    reach = 255 * w.to(torch.int64).abs().reshape(w.shape[0], -1).sum(1)  # |Σ (x − zx)·w| ≤ reach
    bias = None
    if b is not None:
        value = constant_of(gm, b)
        if value is None or not value.is_floating_point():
            raise Unfoldable("bias is not a float constant")
        value = value.to(torch.float64).reshape(-1)
        over = (value / unit).abs() > qops.INT32_MAX - reach
        if bool(over.any()):
            if bool((reach * unit / out.s)[over].max() >= 2 ** -5):
                raise Unfoldable("bias does not fit int32 at scale sx·sw")
            unit = torch.where(over, value.abs() / 2 ** 30, unit)
            w = w.clone()
            w[over] = 0
            reach = torch.where(over, torch.zeros_like(reach), reach)
        bias = torch.round(value / unit).to(torch.int32)
    bound = reach + (bias.to(torch.int64).abs() if bias is not None else 0)
    return (r.weight(gm, dq_w, w, qp), None if bias is None else r.const("bias", bias), (unit / out.s).tolist(),
            bound.tolist())


def _conv(r: _Rewriter, gm, core, out, lo, hi):
    a = list(core.args) + [None] * (7 - len(core.args))
    x, xq = _dq_input(gm, a[0])
    stride, padding, dilation = a[3] or [1, 1], a[4] or [0, 0], a[5] or [1, 1]
    if isinstance(padding, str):
        raise Unfoldable(f"string padding {padding!r}")
    w, bias, reals, bound = _layer(r, gm, a[1], a[2], xq, out, core.meta["val"].shape[1])
    acc = r.call(g.qconv2d.default, x, xq.z, w, bias, list(stride), list(padding), list(dilation), a[6] or 1)
    return r.requantize(acc, 0, reals, 1, out, lo, hi, bound)


def _linear(r: _Rewriter, gm, core, out, lo, hi):
    x, xq = _dq_input(gm, core.args[0])
    w, bias, reals, bound = _layer(r, gm, core.args[1], core.args[2] if len(core.args) > 2 else None, xq, out,
                                   core.meta["val"].shape[-1])
    return r.requantize(r.call(g.qlinear.default, x, xq.z, w, bias), 0, reals, -1, out, lo, hi, bound)


def _matmul(r: _Rewriter, gm, core, out, lo, hi):
    (a, aq), (b, bq) = _dq_input(gm, core.args[0]), _dq_input(gm, core.args[1])
    acc = r.call(g.qmatmul.default, a, aq.z, b, bq.z)
    k = int(core.args[0].meta["val"].shape[-1])
    return r.requantize(acc, 0, [aq.s * bq.s / out.s], 0, out, lo, hi, 255 * 255 * k)  # M = sa·sb/so


def _qadd(r: _Rewriter, gm, core, out, lo, hi):
    """a + b (TFLite's quantized add); a − b negates b's multiplier (gemmlowp's rounding is symmetric)."""
    if core.kwargs.get("alpha", 1) != 1 or len(core.args) > 2:
        raise Unfoldable(f"{core.target.__name__} with alpha ≠ 1")
    (a, aq), (b, bq) = _dq_input(gm, core.args[0]), _dq_input(gm, core.args[1])
    twice_max = 2 * max(aq.s, bq.s)  # TFLite: both sides to 2·max(sa, sb) · 2^-20 units, then to so
    ma, sa = _multipliers([aq.s / twice_max])
    mb, sb = _multipliers([bq.s / twice_max])
    if core.target == aten.sub.Tensor:
        mb = -mb
    mo, so = _multipliers([twice_max / ((1 << qops.LEFT_SHIFT_ADD) * out.s)])
    c = r.const
    return r.call(g.qadd.default, a, aq.z, c("a_mult", ma), c("a_shift", sa), b, bq.z, c("b_mult", mb),
                  c("b_shift", sb), c("out_mult", mo), c("out_shift", so), out.z, lo, hi)


def _qmul(r: _Rewriter, gm, core, out, lo, hi):
    (a, aq), (b, bq) = _dq_input(gm, core.args[0]), _dq_input(gm, core.args[1])
    acc = r.call(g.qmul.default, a, aq.z, b, bq.z)
    return r.requantize(acc, 0, [aq.s * bq.s / out.s], 0, out, lo, hi, 255 * 255)  # M = sa·sb/so


def affine_unit(sx: float, a: torch.Tensor) -> torch.Tensor:
    """The accumulator unit of the per-channel affine a_c·x + b_c on int8 x of scale sx: its weights
    are ±127, so one unit is sx·|a_c|/127 (sx/127 where a_c = 0); b_c is an int32 in that unit."""
    mag = a.abs()
    return sx * torch.where(mag > 0, mag, torch.ones_like(mag)) / 127


def _affine(r: _Rewriter, gm, x, xq: QParams, a: torch.Tensor, b: torch.Tensor, out, lo, hi):
    """q(a_c·dq(x) + b_c) on NCHW ``x`` (a, b: float64 per channel) as a depthwise 1×1 qconv2d with
    weights ±127 — exact, the accumulator's unit sx·|a_c|/127 carries the magnitude — an int32 bias
    in that unit (error ≤ 1/254 of it), then requantize by M_c = sx·|a_c|/(127·so)."""
    shape = x.meta.get("val").shape if x.meta.get("val") is not None else None
    if shape is None or len(shape) != 4:
        raise Unfoldable("a per-channel affine folds on NCHW tensors only")
    if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise Unfoldable("the per-channel scale or offset is not finite")
    unit = affine_unit(xq.s, a)
    w = (torch.sign(a) * 127).to(torch.int8).reshape(-1, 1, 1, 1)
    bias = torch.round(b / unit)
    if bool((bias.abs() > qops.INT32_MAX).any()):
        raise Unfoldable("the affine's offset does not fit int32 in units of sx·|scale|/127")
    acc = r.call(g.qconv2d.default, x, xq.z, r.const("affine_w", w), r.const("affine_b", bias.to(torch.int32)),
                 [1, 1], [0, 0], [1, 1], len(a))
    return r.requantize(acc, 0, (unit / out.s).tolist(), 1, out, lo, hi, (255 * 127 + bias.abs()).tolist())


def _batch_norm(r: _Rewriter, gm, core, out, lo, hi):
    """BatchNorm no conv absorbed (e.g. pre-activation after a concat): y = a·x + b per channel."""
    x, gamma_n, beta_n, mean_n, var_n, eps, training, _ = bn_parts(core)
    if training:
        raise Unfoldable("BatchNorm in training mode")
    values = [constant_of(gm, n) if n is not None else None for n in (gamma_n, beta_n, mean_n, var_n)]
    if values[2] is None or values[3] is None or any(v is None for v, n in zip(values, (gamma_n, beta_n))
                                                     if n is not None):
        raise Unfoldable("BatchNorm statistics or affine parameters are not constants")
    mean, var = values[2].to(torch.float64), values[3].to(torch.float64)
    gamma = values[0].to(torch.float64) if values[0] is not None else torch.ones_like(mean)
    beta = values[1].to(torch.float64) if values[1] is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + eps)
    xi, xq = _dq_input(gm, x)
    return _affine(r, gm, xi, xq, a, beta - mean * a, out, lo, hi)


def _channel_constant(c: torch.Tensor, x_shape) -> torch.Tensor | None:
    """A constant that broadcasts along the channels of an NCHW tensor only, as a length-C vector."""
    if len(x_shape) != 4 or c.dim() > 4:
        return None
    shape = [1] * (4 - c.dim()) + list(c.shape)
    if shape[0] != 1 or shape[2:] != [1, 1] or shape[1] not in (1, x_shape[1]):
        return None
    return c.to(torch.float64).reshape(-1).expand(int(x_shape[1])).clone()


def _arith(r: _Rewriter, gm, core, out, lo, hi):
    """add / sub / mul / div: of two quantized tensors (add → qadd, mul → qmul), of one and Python
    scalars (a lookup table), of one and a per-channel constant (an integer affine)."""
    tensors = [a for a in (*core.args, *core.kwargs.values()) if isinstance(a, fx.Node)]
    if len(tensors) == 1:
        return _elementwise(r, gm, core, out, lo, hi)
    op = core.target
    consts = [constant_of(gm, t) for t in core.args[:2]]
    if len(core.args) == 2 and (consts[0] is None) != (consts[1] is None) and core.kwargs.get("alpha", 1) == 1:
        i = 0 if consts[0] is None else 1  # the activation operand
        x, xq = _dq_input(gm, core.args[i])
        c = _channel_constant(consts[1 - i], x.meta["val"].shape) if x.meta.get("val") is not None else None
        if c is None:
            raise Unfoldable("constant operand does not broadcast along the channels only")
        one, zero = torch.ones_like(c), torch.zeros_like(c)
        if op == aten.mul.Tensor:
            a, b = c, zero
        elif op == aten.add.Tensor:
            a, b = one, c
        elif op == aten.sub.Tensor:
            a, b = (one, -c) if i == 0 else (-one, c)
        elif op == aten.div.Tensor and i == 0 and not core.kwargs.get("rounding_mode"):
            a, b = 1.0 / c, zero
        else:
            raise Unfoldable(f"{op.__name__} with a constant divisor or rounding mode")
        return _affine(r, gm, x, xq, a, b, out, lo, hi)
    if op in (aten.add.Tensor, aten.sub.Tensor):
        return _qadd(r, gm, core, out, lo, hi)
    if op == aten.mul.Tensor and len(core.args) == 2:
        return _qmul(r, gm, core, out, lo, hi)
    raise Unfoldable(f"{op.__name__} of two quantized tensors has no integer form (add, sub and mul do)")


def _cat(r: _Rewriter, gm, core, out, lo, hi):
    ins = [_dq_input(gm, t) for t in core.args[0]]
    parts = [r.rescale(x, xq, out, lo, hi) for x, xq in ins]
    return r.call(aten.cat.default, parts, *core.args[1:])


def _pass_through(r: _Rewriter, gm, core, out, lo, hi):  # max pooling and views commute with (s, z)
    x, xq = _dq_input(gm, core.args[0])
    return r.rescale(r.call(core.target, x, *core.args[1:]), xq, out, lo, hi)


def _pad(r: _Rewriter, gm, core, out, lo, hi):
    """Padding of an int8 tensor: constant pads fill with the value's own code (the zero point for
    0.0, so exact), reflect/replicate/circular pads move int8 values; rescaled first if the output's
    params differ (the quantizer shares them)."""
    x, xq = _dq_input(gm, core.args[0])
    pad = _ints(core.args[1])
    if core.target is aten.pad.default:
        mode = core.args[2] if len(core.args) > 2 else core.kwargs.get("mode", "constant")
        value = core.args[3] if len(core.args) > 3 else core.kwargs.get("value")
    else:
        mode, value = "constant", core.args[2] if len(core.args) > 2 else core.kwargs.get("value", 0.0)
    y = r.rescale(x, xq, out, lo, hi)
    if mode != "constant":
        return r.call(aten.pad.default, y, pad, mode)
    code = qd.quantize_per_tensor(torch.tensor([float(value or 0.0)]), out.s, out.z, lo, hi, torch.int8)
    return r.call(aten.constant_pad_nd.default, y, pad, int(code))


def _split_item(r: _Rewriter, gm, core, out, lo, hi):
    """Item i of chunk/split: a slice of the int8 tensor (the quantizer shares the split input's params)."""
    split, index = core.args
    if not is_op(split, *SPLITS):
        raise Unfoldable(f"item of {getattr(split, 'name', split)}, which is not a split or chunk")
    x, xq = _dq_input(gm, split.args[0])
    parts = split.meta.get("val")
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    dim %= parts[0].dim()
    if dim == 0:
        raise Unfoldable("split along the batch dimension")
    sizes = _ints(p.shape[dim] for p in parts)
    start = sum(sizes[:index])
    return r.rescale(r.call(aten.slice.Tensor, x, dim, start, start + sizes[index]), xq, out, lo, hi)


def _ints(sizes) -> list[int]:
    """Concrete sizes (a graph captured with a symbolic batch may carry expressions in the batch's
    symbol for other dims, e.g. after reshape(1, -1, c); op arguments must be plain ints)."""
    return [int(d) for d in sizes]


def _sum_pool(r, gm, x, xq, kernel, stride, padding, out, lo, hi, divisor=None):
    kernel, stride, padding = _ints(kernel), _ints(stride), _ints(padding)
    if kernel == stride == [1, 1] and padding == [0, 0] and divisor in (None, 1):
        return r.rescale(x, xq, out, lo, hi)  # 1×1 windows (pooling what is pooled already): a rescale
    acc = r.call(g.qsum_pool2d.default, x, xq.z, kernel, stride, padding)
    divisor = divisor or kernel[0] * kernel[1]
    return r.requantize(acc, 0, [xq.s / (out.s * divisor)], 0, out, lo, hi,
                        255 * kernel[0] * kernel[1])  # M = sx/(so·k)


def _avg_pool(r: _Rewriter, gm, core, out, lo, hi):
    a = list(core.args) + [None] * (7 - len(core.args))
    x, xq = _dq_input(gm, a[0])
    kernel = list(a[1]) * (2 // len(a[1]))
    stride = list(a[2] or kernel) * (2 // len(a[2] or kernel))
    padding = list(a[3] or [0, 0]) * (2 // len(a[3] or [0, 0]))
    ceil_mode = a[4] or core.kwargs.get("ceil_mode", False)
    count_include_pad = a[5] if a[5] is not None else core.kwargs.get("count_include_pad", True)
    divisor = a[6] if a[6] is not None else core.kwargs.get("divisor_override")
    h, w = _ints(a[0].meta["val"].shape[-2:])
    floor = [(n + 2 * p - k) // st + 1 for n, p, k, st in zip((h, w), padding, kernel, stride)]
    if ceil_mode and _ints(core.meta["val"].shape[-2:]) != floor:
        raise Unfoldable("avg_pool2d with ceil_mode: the last windows are partial (another divisor)")
    if any(padding) and count_include_pad is False and divisor is None:
        raise Unfoldable("avg_pool2d with count_include_pad=False: windows at the border divide by fewer values")
    return _sum_pool(r, gm, x, xq, kernel, stride, padding, out, lo, hi, divisor)


def _adaptive_avg_pool(r: _Rewriter, gm, core, out, lo, hi):
    x, xq = _dq_input(gm, core.args[0])
    h, w = _ints(core.args[0].meta["val"].shape[-2:])
    oh, ow = (int(o) if o is not None else n for o, n in zip(core.args[1], (h, w)))
    if h % oh or w % ow:
        raise Unfoldable(f"adaptive pooling {h}x{w} → {oh}x{ow} has uneven windows")
    return _sum_pool(r, gm, x, xq, [h // oh, w // ow], [h // oh, w // ow], [0, 0], out, lo, hi)


def _mean(r: _Rewriter, gm, core, out, lo, hi):
    x, xq = _dq_input(gm, core.args[0])
    shape = core.args[0].meta["val"].shape
    dims = sorted(d % len(shape) for d in core.args[1])
    if len(shape) != 4 or dims != [2, 3]:
        raise Unfoldable(f"mean over dims {core.args[1]} (only spatial means of NCHW fold)")
    y = _sum_pool(r, gm, x, xq, _ints(shape[2:]), _ints(shape[2:]), [0, 0], out, lo, hi)
    keepdim = core.args[2] if len(core.args) > 2 else core.kwargs.get("keepdim", False)
    return y if keepdim else r.call(aten.flatten.using_ints, y, 1)


def _elementwise(r: _Rewriter, gm, core, out, lo, hi):
    """f(dq(x)) for f elementwise in one tensor: a 256-entry table made by the QDQ form's own fp32 f,
    or a clamp when f only narrows the range and input and output share their params."""
    if not isinstance(core.args[0], fx.Node) or any(isinstance(v, fx.Node) for v in (*core.args[1:],
                                                                                      *core.kwargs.values())):
        raise Unfoldable("more than one tensor operand")
    x, xq = _dq_input(gm, core.args[0])
    if core.target in CLAMPS and xq.same(out):
        narrow = _range(out, *CLAMPS[core.target](core))
        return r.rescale(x, xq, out, max(lo, narrow[0]), min(hi, narrow[1]))
    codes = torch.arange(-128, 128, dtype=torch.int8)
    real = qd.dequantize_per_tensor(codes, xq.s, xq.z, -128, 127, torch.int8)
    y = core.target(real, *core.args[1:], **core.kwargs)
    if not isinstance(y, torch.Tensor) or y.shape != real.shape or not y.is_floating_point():
        raise Unfoldable("not elementwise in its tensor operand")
    table = qd.quantize_per_tensor(y, out.s, out.z, lo, hi, torch.int8)  # the QDQ form's own fp32 op
    return r.call(g.qlut.default, x, r.const("lut", table))


def _requant(r: _Rewriter, gm, core, out, lo, hi):
    x, xq = _dq_input(gm, core)
    return r.rescale(x, xq, out, lo, hi)


# core op → rule(rewriter, gm, core, out params, qmin, qmax) -> int8 node
RULES = {
    aten.conv2d.default: _conv, aten.linear.default: _linear,
    aten.matmul.default: _matmul, aten.mm.default: _matmul, aten.bmm.default: _matmul,
    **{op: _arith for op in _SCALAR_ARITHMETIC}, aten.cat.default: _cat,
    **{v: _pass_through for v in PASS_THROUGH}, **{p: _pad for p in PADS}, operator.getitem: _split_item,
    aten.avg_pool2d.default: _avg_pool, aten.adaptive_avg_pool2d.default: _adaptive_avg_pool, aten.mean.dim: _mean,
    **{u: _elementwise for u in _UNARY}, **{b: _batch_norm for b in BATCH_NORMS},
    **{d: _requant for d in DQ_TENSOR},
}


def _positional(node: fx.Node) -> fx.Node:
    """Move keyword arguments an ATen schema also takes by position into ``args`` (in place, same
    call), so rules read ``args`` only: passes leave e.g. ``conv2d(x, w, bias=b)`` (FoldBatchNorm)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not node.kwargs:
        return node
    positional = [a for a in schema.arguments if not a.kwarg_only]
    names = {a.name for a in positional}
    if not names & set(node.kwargs):
        return node
    last = max(i for i, a in enumerate(positional) if i < len(node.args) or a.name in node.kwargs)
    args = [node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value)
            for i, a in enumerate(positional[:last + 1])]
    node.args, node.kwargs = tuple(args), {k: v for k, v in node.kwargs.items() if k not in names}
    return node


def producer(node) -> fx.Node | None:
    """The op computing a float value: the node itself, or the BatchNorm behind ``getitem(bn, 0)``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is operator.getitem and is_op(node.args[0], BATCH_NORMS[1]) and node.args[1] == 0:
        return node.args[0]
    return node


def fuses_clamp(node) -> bool:
    """A relu/relu6/hardtanh/clamp after ``node`` folds into its integer output range."""
    p = producer(node)
    return p is not None and p.target in FUSES_CLAMP


def float_compute(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes computing in floating point downstream of a dequantize (the QDQ ops themselves excepted):
    the float islands of a quantized graph — declined patterns, weight-only layers."""
    tainted, found = set(), []
    for n in gm.graph.nodes:
        if n.op != "call_function" or is_op(n, *Q_TENSOR, QSIGN, *qops.QDQ_OPS):
            if is_op(n, *DQ_TENSOR, *DQ_CHANNEL):
                tainted.add(n)
            continue
        if not any(a in tainted for a in n.all_input_nodes):
            continue
        v = n.meta.get("val")
        values = v if isinstance(v, (list, tuple)) else [v]
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in values):
            tainted.add(n)
            if n.target is not operator.getitem:
                found.append(n)
    return found


def _float_users_of_weights(gm, node):
    return is_op(node, *DQ_TENSOR, *DQ_CHANNEL) and constant_of(gm, node.args[0]) is not None and any(
        is_op(u, aten.conv2d.default, aten.linear.default, aten.conv1d.default) for u in node.users)


class FoldQDQ(GraphPass):
    name = "fold-qdq"
    requires = frozenset({Property.ATEN})
    exact = False  # integer requantization differs from the fp32 QDQ simulation by at most 1 LSB

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: dict = {"folded": 0, "weight_bytes": 0, "weight_bytes_fp32": 0}
        declined = []
        quantized = any(is_op(n, *Q_TENSOR, *DQ_TENSOR, QSIGN) for n in gm.graph.nodes)
        for q in list(gm.graph.nodes):
            if is_op(q, QSIGN):
                declined += self._fold_sign(gm, q, stats)
            if not is_op(q, *Q_TENSOR) or not isinstance(q.args[0], fx.Node) or q.args[0].op != "call_function":
                continue  # a graph input's quantize is the integer graph's boundary
            core, lo, hi = producer(q.args[0]), None, None
            if core is not None and core.target in CLAMPS and len(core.args[0].users) == 1:
                inner = producer(core.args[0])
                if inner is not None and inner.target in RULES and inner.target not in (*CLAMPS, *DQ_TENSOR):
                    lo, hi = CLAMPS[_positional(core).target](core)
                    core = inner
            core = _positional(core) if core is not None else None
            rule = RULES.get(core.target) if core is not None else None
            if rule is None:
                what = core.target.__name__ if core is not None else q.args[0]
                declined.append(Decline.at(self.name, q, f"{what} has no integer form here; kept in QDQ form "
                                                         f"(dequantize → fp32 {what} → quantize)"))
                continue
            before = {"weight_bytes": stats["weight_bytes"], "weight_bytes_fp32": stats["weight_bytes_fp32"]}
            r = _Rewriter(gm, q, stats)
            try:
                out = _qparams(gm, q)
                new = rule(r, gm, core, out, *_range(out, lo, hi))
            except Unfoldable as exc:
                r.rollback()
                stats.update(before)
                declined.append(Decline.at(self.name, q, f"{core.target.__name__}: {exc}; kept in QDQ form"))
                continue
            new.meta["val"] = q.meta.get("val")
            new.meta["folded_from"] = q.name  # the quantize node whose value it computes
            q.replace_all_uses_with(new)
            gm.graph.erase_node(q)
            stats["folded"] += 1
            kind = core.target.__name__.split(".")[0]
            stats[kind] = stats.get(kind, 0) + 1
        modified = stats["folded"] > 0 or stats.get("sign", 0) > 0
        if modified:
            gm.graph.eliminate_dead_code()
            delete_unused_attributes(gm)
            gm.graph.lint()
            gm.recompile()
        declined += [Decline.at(self.name, n, "weight-only quantization: int8 weights are dequantized and the "
                                              "layer computes in fp32 (no quantized output to fold into)")
                     for n in gm.graph.nodes if _float_users_of_weights(gm, n)]
        if not stats["weight_bytes"]:
            stats = {k: v for k, v in stats.items() if not k.startswith("weight_bytes")}
        if quantized:
            left = float_compute(gm)
            stats["float_ops"] = len(left)
            stats["float_ops_by_kind"] = {}
            for n in left:
                kind = getattr(n.target, "__name__", str(n.target))
                stats["float_ops_by_kind"][kind] = stats["float_ops_by_kind"].get(kind, 0) + 1
        return PassResult(gm, modified, stats, tuple(declined))

    def _fold_sign(self, gm, node, stats) -> list[Decline]:
        """quantize_sign(dq(x)) = qsign(x, zx): sign((x − zx)·sx) with sx > 0."""
        try:
            x, xq = _dq_input(gm, node.args[0])
        except Unfoldable as exc:
            return [Decline.at(self.name, node, f"binary activation: {exc}; kept in fp32")]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(g.qsign.default, (x, xq.z))
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        stats["sign"] = stats.get("sign", 0) + 1
        return []
