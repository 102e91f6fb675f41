"""Fold quantize/dequantize (QDQ) patterns into graphopt's integer operators (`graphopt.qops`).

Each ``quantize_per_tensor(v)`` whose float value ``v`` is computed from dequantized int8 values
becomes integer arithmetic ending in a fixed-point requantize (s = scale, z = zero point):

    q(act(conv(dq(x), dq(w), b)))  = requantize(qconv2d(x, zx, w, round(b / sx·sw)), M = sx·sw/so, zo, act range)
    q(act(linear(dq(x), dq(w), b)))= requantize(qlinear(...)) ;  q(matmul(dq(a), dq(b))) = requantize(qmatmul(...))
    q(act(add(dq(a), dq(b))))      = qadd(a, b)                          (TFLite: ≪20, rescale each, sum, rescale)
    q(cat(dq(x_i)))                = cat(requantize(x_i, M = s_i/so))    (inputs already at (so, zo) pass through)
    q(maxpool / view-like(dq(x)))  = op(x), requantized if (sx, zx) ≠ (so, zo)
    q(avgpool(dq(x)))              = requantize(qsum_pool2d(x, zx), M = sx/(so·k))
    q(f(dq(x))), f unary           = qlut(x, table), table[i] = q(f(dq(i)))   (exact: same fp32 f as the QDQ form)
    q(dq(x))                       = requantize(x, M = sx/so)
    qsign(dq(x))  (binary act)     = qsign(x, zx)

``act`` (relu, relu6/hardtanh, clamp) is folded into the output range: q(relu(y)) = max(q(y), zo).
Weights of 4, 2 or 1 bits (read from the dequantize's quant range) are stored packed and
unpacked by `graphopt::unpack_bits`. Declined, with the reason, and left in QDQ form (which still
lowers): quantize nodes whose producer has no integer form here, non-constant weights, uint8 or
non-8-bit quantize dtypes, float bias that is not a constant, avg-pool options other than plain
windows, and weight-only layers (int8 weights dequantized, fp32 compute).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from graphopt import qops
from graphopt.passes.base import Decline, GraphPass, PassContext, PassResult, Property
from graphopt.passes.graph import add_constant, constant_of, delete_unused_attributes, is_op

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
          aten.silu.default, aten.elu.default, aten.leaky_relu.default)
_VIEWS = (aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.permute.default,
          aten.squeeze.dims, aten.unsqueeze.default, aten.transpose.int, aten.contiguous.default,
          aten.clone.default, aten.slice.Tensor)
PASS_THROUGH = (*_VIEWS, aten.max_pool2d.default)  # commute with (s, z): they share their input's params


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

    def same(self, other: QParams) -> bool:
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

    def requantize(self, acc, in_zp: int, reals, axis: int, out: QParams, lo: int, hi: int) -> fx.Node:
        m, s = qops.multiplier_tensors(reals)
        return self.call(g.requantize.default, acc, in_zp, self.const("mult", m), self.const("shift", s),
                         axis, out.z, lo, hi)

    def rescale(self, x, xq: QParams, out: QParams, lo: int, hi: int) -> fx.Node:
        """x at (sx, zx) → (so, zo) within [lo, hi]; nothing if already there."""
        if xq.same(out) and (lo, hi) == (out.qmin, out.qmax):
            return x
        if xq.same(out):
            return self.call(aten.clamp.default, x, lo, hi)
        return self.requantize(x, xq.z, [xq.s / out.s], 0, out, lo, hi)

    def weight(self, gm, dq_w: fx.Node, channels: int) -> tuple[fx.Node, QParams]:
        """(int weight node, params) for a dequantized constant weight; packs weights below 8 bits."""
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
            qp = QParams(qp.scale.expand(channels).clone(), qp.zero_point.expand(channels).clone(), 0,
                         qp.qmin, qp.qmax)
        bits = _weight_bits(qp, w)
        self.stats["weight_bytes"] += (w.numel() * bits + 7) // 8
        self.stats["weight_bytes_fp32"] += w.numel() * 4
        if bits == 8:
            return dq_w.args[0], qp
        packed = self.const(f"w{bits}", qops.pack_bits(w, bits))
        self.stats[f"packed_int{bits}"] = self.stats.get(f"packed_int{bits}", 0) + 1
        return self.call(g.unpack_bits.default, packed, bits, list(w.shape)), qp

    def bias(self, gm, b, real_scales: torch.Tensor):
        if b is None:
            return None
        value = constant_of(gm, b)
        if value is None or not value.is_floating_point():
            raise Unfoldable("bias is not a float constant")
        q = torch.round(value.to(torch.float64) / real_scales)
        if bool((q.abs() > qops.INT32_MAX).any()):
            raise Unfoldable("bias does not fit int32 at scale sx·sw")
        return self.const("bias", q.to(torch.int32))


def _conv(r: _Rewriter, gm, core, out, lo, hi):
    a = list(core.args) + [None] * (7 - len(core.args))
    x, xq = _dq_input(gm, a[0])
    stride, padding, dilation = a[3] or [1, 1], a[4] or [0, 0], a[5] or [1, 1]
    if isinstance(padding, str):
        raise Unfoldable(f"string padding {padding!r}")
    channels = core.meta["val"].shape[1]
    w, wq = r.weight(gm, a[1], channels)
    sw = xq.s * wq.scale
    acc = r.call(g.qconv2d.default, x, xq.z, w, r.bias(gm, a[2], sw), list(stride), list(padding), list(dilation),
                 a[6] or 1)
    return r.requantize(acc, 0, (sw / out.s).tolist(), 1, out, lo, hi)  # M_c = sx·sw_c/so


def _linear(r: _Rewriter, gm, core, out, lo, hi):
    x, xq = _dq_input(gm, core.args[0])
    w, wq = r.weight(gm, core.args[1], core.meta["val"].shape[-1])
    sw = xq.s * wq.scale
    acc = r.call(g.qlinear.default, x, xq.z, w, r.bias(gm, core.args[2] if len(core.args) > 2 else None, sw))
    return r.requantize(acc, 0, (sw / out.s).tolist(), -1, out, lo, hi)


def _matmul(r: _Rewriter, gm, core, out, lo, hi):
    (a, aq), (b, bq) = _dq_input(gm, core.args[0]), _dq_input(gm, core.args[1])
    acc = r.call(g.qmatmul.default, a, aq.z, b, bq.z)
    return r.requantize(acc, 0, [aq.s * bq.s / out.s], 0, out, lo, hi)  # M = sa·sb/so


def _add(r: _Rewriter, gm, core, out, lo, hi):
    if core.kwargs.get("alpha", 1) != 1 or len(core.args) > 2:
        raise Unfoldable("add with alpha ≠ 1")
    (a, aq), (b, bq) = _dq_input(gm, core.args[0]), _dq_input(gm, core.args[1])
    twice_max = 2 * max(aq.s, bq.s)  # TFLite: both sides to 2·max(sa, sb) · 2^-20 units, then to so
    ma, sa = qops.multiplier_tensors([aq.s / twice_max])
    mb, sb = qops.multiplier_tensors([bq.s / twice_max])
    mo, so = qops.multiplier_tensors([twice_max / ((1 << qops.LEFT_SHIFT_ADD) * out.s)])
    c = r.const
    return r.call(g.qadd.default, a, aq.z, c("a_mult", ma), c("a_shift", sa), b, bq.z, c("b_mult", mb),
                  c("b_shift", sb), c("out_mult", mo), c("out_shift", so), out.z, lo, hi)


def _cat(r: _Rewriter, gm, core, out, lo, hi):
    ins = [_dq_input(gm, t) for t in core.args[0]]
    parts = [r.rescale(x, xq, out, lo, hi) for x, xq in ins]
    return r.call(aten.cat.default, parts, *core.args[1:])


def _pass_through(r: _Rewriter, gm, core, out, lo, hi):  # max pooling and views commute with (s, z)
    x, xq = _dq_input(gm, core.args[0])
    return r.rescale(r.call(core.target, x, *core.args[1:]), xq, out, lo, hi)


def _sum_pool(r, gm, x, xq, kernel, stride, padding, out, lo, hi):
    acc = r.call(g.qsum_pool2d.default, x, xq.z, list(kernel), list(stride), list(padding))
    return r.requantize(acc, 0, [xq.s / (out.s * kernel[0] * kernel[1])], 0, out, lo, hi)  # M = sx/(so·k)


def _avg_pool(r: _Rewriter, gm, core, out, lo, hi):
    a = list(core.args) + [None] * (7 - len(core.args))
    x, xq = _dq_input(gm, a[0])
    kernel = list(a[1]) * (2 // len(a[1]))
    stride = list(a[2] or kernel) * (2 // len(a[2] or kernel))
    padding = list(a[3] or [0, 0]) * (2 // len(a[3] or [0, 0]))
    if a[4] or a[6] is not None or (any(padding) and a[5] is False):
        raise Unfoldable("avg_pool2d with ceil_mode, divisor_override or count_include_pad=False")
    return _sum_pool(r, gm, x, xq, kernel, stride, padding, out, lo, hi)


def _adaptive_avg_pool(r: _Rewriter, gm, core, out, lo, hi):
    x, xq = _dq_input(gm, core.args[0])
    h, w = core.args[0].meta["val"].shape[-2:]
    oh, ow = core.args[1]
    if h % oh or w % ow:
        raise Unfoldable(f"adaptive pooling {h}x{w} → {oh}x{ow} has uneven windows")
    return _sum_pool(r, gm, x, xq, [h // oh, w // ow], [h // oh, w // ow], [0, 0], out, lo, hi)


def _mean(r: _Rewriter, gm, core, out, lo, hi):
    x, xq = _dq_input(gm, core.args[0])
    shape = core.args[0].meta["val"].shape
    dims = sorted(d % len(shape) for d in core.args[1])
    if len(shape) != 4 or dims != [2, 3]:
        raise Unfoldable(f"mean over dims {core.args[1]} (only spatial means of NCHW fold)")
    y = _sum_pool(r, gm, x, xq, list(shape[2:]), list(shape[2:]), [0, 0], out, lo, hi)
    keepdim = core.args[2] if len(core.args) > 2 else core.kwargs.get("keepdim", False)
    return y if keepdim else r.call(aten.flatten.using_ints, y, 1)


def _unary(r: _Rewriter, gm, core, out, lo, hi):
    x, xq = _dq_input(gm, core.args[0])
    codes = torch.arange(-128, 128, dtype=torch.int8)
    real = qd.dequantize_per_tensor(codes, xq.s, xq.z, -128, 127, torch.int8)
    y = core.target(real, *core.args[1:], **core.kwargs)
    table = qd.quantize_per_tensor(y, out.s, out.z, lo, hi, torch.int8)  # the QDQ form's own fp32 op
    return r.call(g.qlut.default, x, r.const("lut", table))


def _requant(r: _Rewriter, gm, core, out, lo, hi):
    x, xq = _dq_input(gm, core)
    return r.rescale(x, xq, out, lo, hi)


# core op → rule(rewriter, gm, core, out params, qmin, qmax) -> int8 node
RULES = {
    aten.conv2d.default: _conv, aten.linear.default: _linear,
    aten.matmul.default: _matmul, aten.mm.default: _matmul, aten.bmm.default: _matmul,
    aten.add.Tensor: _add, aten.cat.default: _cat,
    **{v: _pass_through for v in PASS_THROUGH},
    aten.avg_pool2d.default: _avg_pool, aten.adaptive_avg_pool2d.default: _adaptive_avg_pool, aten.mean.dim: _mean,
    **{u: _unary for u in _UNARY},
    **{d: _requant for d in DQ_TENSOR},
}
_FUSES_CLAMP = (aten.conv2d.default, aten.linear.default, aten.add.Tensor, *(m for m in RULES
                if RULES[m] in (_matmul, _avg_pool, _adaptive_avg_pool, _mean)))


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
        for q in list(gm.graph.nodes):
            if is_op(q, QSIGN):
                declined += self._fold_sign(gm, q, stats)
            if not is_op(q, *Q_TENSOR):
                continue
            core, lo, hi = q.args[0], None, None
            if isinstance(core, fx.Node) and core.op == "call_function" and core.target in CLAMPS \
                    and core.args[0].op == "call_function" and core.args[0].target in _FUSES_CLAMP \
                    and len(core.args[0].users) == 1:
                lo, hi = CLAMPS[core.target](core)
                core = core.args[0]
            rule = RULES.get(core.target) if isinstance(core, fx.Node) and core.op == "call_function" else None
            if rule is None:
                what = core.target.__name__ if isinstance(core, fx.Node) and core.op == "call_function" else core
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
