"""Converters from graphopt's integer operators (and PT2E's quantize/dequantize ops) to Relax.

`converters()` is the ``custom_convert_map`` for TVM's ``from_exported_program``: keys are the
importer's op names (``"qconv2d.default"``), values ``fn(node, importer) -> relax.Var``. Relax has
no qnn ops, so integer compute is plain ops with ``out_dtype`` — ``conv2d(int8, int8) → int32`` on
input padded with its zero point, minus zx·Σw — and requantization is the gemmlowp fixed-point
arithmetic of `graphopt.qops` written as int64 elementwise ops. Every converter reproduces the
`graphopt.qops` contract bit for bit (rounding half to even where PyTorch does). Add more with
`register_converter`; it refuses (ConfigError) a name that is already registered.
"""
from __future__ import annotations

from typing import Callable

import torch

from graphopt.errors import ConfigError

_CONVERTERS: dict[str, Callable] = {}
_DTYPES = {torch.int8: "int8", torch.uint8: "uint8", torch.int32: "int32", torch.float32: "float32"}


def register_converter(op_name: str, fn: Callable | None = None):
    """Register ``fn(node, importer) -> relax.Var`` for the importer op name ``op_name``; usable as a decorator."""
    def add(f):
        if op_name in _CONVERTERS:
            raise ConfigError(f"a converter for {op_name!r} is already registered")
        _CONVERTERS[op_name] = f
        return f

    return add if fn is None else add(fn)


def converters() -> dict[str, Callable]:
    """The custom_convert_map for ``from_exported_program`` (a copy)."""
    return dict(_CONVERTERS)


def _args(node, imp):
    return imp.retrieve_args(node)


def _i64(v):
    from tvm import relax

    return relax.const(v, "int64")


def _emit(imp, expr):
    return imp.block_builder.emit(expr)


def _mbqm_expr(acc, m0, shift):
    """MultiplyByQuantizedMultiplier as one int64 TIR expression, written so that no sub-term is used
    more than twice (kernels inline it into consumers):

        x = sat32(acc ≪ left);  high = truncdiv(x·M0 + (x ≥ 0 ? 2^30 : 1 − 2^30), 2^31)      (SRDHM, M0 > 0)
        RDBPOT(high, right) = (high + ⌊2^right / 2⌋ − [high < 0 ∧ right > 0]) ≫ right      (ties away from 0)

    `graphopt.qref` computes the textbook gemmlowp form; tests check the two agree bit for bit."""
    from tvm import tirx

    def c(v):
        return tirx.const(v, "int64")

    left, right = tirx.max(shift, c(0)), tirx.max(c(0) - shift, c(0))
    x = tirx.min(tirx.max(acc << left, c(-(2 ** 31))), c(2 ** 31 - 1))
    high = tirx.truncdiv(x * m0 + tirx.Select(x >= c(0), c(1 << 30), c(1 - (1 << 30))), c(1 << 31))
    nudge = ((c(1) << right) >> c(1)) - tirx.Cast("int64", tirx.all(high < c(0), right > c(0)))
    return (high + nudge) >> right


def _emit_unfused(imp, compute, *args, name: str):
    """emit_te, with the kernel marked opaque so FuseOps keeps it whole: fused schedules inline
    producers into consumers, and chains of fixed-point expressions would grow multiplicatively."""
    bb = imp.block_builder
    out = bb.emit_te(compute, *args, primfunc_name_hint=name)
    gv = bb.lookup_binding(out).args[0]
    bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", 8))  # kOpaque
    return out


def _clamp_int8_expr(y, lo: int, hi: int):
    from tvm import tirx

    return tirx.Cast("int8", tirx.min(tirx.max(y, tirx.const(lo, "int64")), tirx.const(hi, "int64")))


def _ndim(node) -> int:
    return node.meta["val"].dim()


@register_converter("requantize.default")
def _requantize(node, imp):
    from tvm import te, tirx

    acc, in_zp, mult, shift, axis, out_zp, qmin, qmax = _args(node, imp)
    per_channel = node.args[2].meta["val"].numel() > 1
    axis = axis % _ndim(node)

    def compute(acc_t, m_t, s_t):
        def body(*idx):
            ch = idx[axis] if per_channel else 0
            a = tirx.Cast("int64", acc_t[idx]) - tirx.const(in_zp, "int64")
            y = _mbqm_expr(a, tirx.Cast("int64", m_t[ch]), tirx.Cast("int64", s_t[ch]))
            return _clamp_int8_expr(y + tirx.const(out_zp, "int64"), qmin, qmax)

        return te.compute(acc_t.shape, body, name="requantize")

    return _emit_unfused(imp, compute, acc, mult, shift, name="requantize")


def _zp_times_weight_sum(imp, w, x_zp: int, axes: list[int]):
    """x_zp · Σ w over ``axes`` (int32): the zero-point term of Σ (x − zx)·w = Σ x·w − zx·Σ w."""
    from tvm import relax

    return _emit(imp, relax.op.multiply(relax.op.sum(relax.op.astype(w, "int32"), axis=axes),
                                        relax.const(x_zp, "int32")))


@register_converter("qconv2d.default")
def _qconv2d(node, imp):
    from tvm import relax

    x, x_zp, w, bias, stride, padding, dilation, groups = _args(node, imp)
    ph, pw = padding
    if ph or pw:  # pad with the zero point (real 0), then the conv itself needs no padding
        x = _emit(imp, relax.op.nn.pad(x, [0, 0, 0, 0, ph, ph, pw, pw], pad_value=float(x_zp)))
    acc = _emit(imp, relax.op.nn.conv2d(x, w, strides=stride, padding=0, dilation=dilation, groups=groups,
                                        out_dtype="int32"))
    if x_zp:
        corr = _zp_times_weight_sum(imp, w, x_zp, [1, 2, 3])
        acc = _emit(imp, relax.op.subtract(acc, relax.op.reshape(corr, [1, -1, 1, 1])))
    return acc if bias is None else _emit(imp, relax.op.add(acc, relax.op.reshape(bias, [1, -1, 1, 1])))


@register_converter("qlinear.default")
def _qlinear(node, imp):
    from tvm import relax

    x, x_zp, w, bias = _args(node, imp)
    acc = _emit(imp, relax.op.matmul(x, relax.op.permute_dims(w, [1, 0]), out_dtype="int32"))
    if x_zp:
        acc = _emit(imp, relax.op.subtract(acc, _zp_times_weight_sum(imp, w, x_zp, [1])))
    return acc if bias is None else _emit(imp, relax.op.add(acc, bias))


@register_converter("qmatmul.default")
def _qmatmul(node, imp):
    from tvm import relax

    a, a_zp, b, b_zp = _args(node, imp)
    shifted = [_emit(imp, relax.op.subtract(relax.op.astype(t, "int32"), relax.const(z, "int32")))
               for t, z in ((a, a_zp), (b, b_zp))]
    return _emit(imp, relax.op.matmul(*shifted, out_dtype="int32"))


@register_converter("qsum_pool2d.default")
def _qsum_pool2d(node, imp):
    import numpy as np
    from tvm import relax

    x, x_zp, kernel, stride, padding = _args(node, imp)
    c = int(node.args[0].meta["val"].shape[1])
    ph, pw = padding
    if ph or pw:
        x = _emit(imp, relax.op.nn.pad(x, [0, 0, 0, 0, ph, ph, pw, pw], pad_value=float(x_zp)))
    ones = relax.const(np.ones((c, 1, *kernel), dtype="int8"))  # Σ window = depthwise conv with ones
    acc = _emit(imp, relax.op.nn.conv2d(x, ones, strides=stride, padding=0, groups=c, out_dtype="int32"))
    if not x_zp:
        return acc
    return _emit(imp, relax.op.subtract(acc, relax.const(x_zp * kernel[0] * kernel[1], "int32")))


@register_converter("qadd.default")
def _qadd(node, imp):
    from tvm import te, tirx, topi

    from graphopt.qops import LEFT_SHIFT_ADD

    a, a_zp, am, ash, b, b_zp, bm, bsh, om, osh, out_zp, qmin, qmax = _args(node, imp)
    shape = [int(d) for d in node.meta["val"].shape]

    def compute(a_t, b_t, am_t, ash_t, bm_t, bsh_t, om_t, osh_t):
        a_t, b_t = topi.broadcast_to(a_t, shape), topi.broadcast_to(b_t, shape)

        def i64(x):
            return tirx.Cast("int64", x)

        def side(x, zp, m, s):
            return _mbqm_expr((i64(x) - tirx.const(zp, "int64")) << tirx.const(LEFT_SHIFT_ADD, "int64"), i64(m[0]),
                              i64(s[0]))

        def body(*idx):
            total = side(a_t[idx], a_zp, am_t, ash_t) + side(b_t[idx], b_zp, bm_t, bsh_t)
            y = _mbqm_expr(total, i64(om_t[0]), i64(osh_t[0]))
            return _clamp_int8_expr(y + tirx.const(out_zp, "int64"), qmin, qmax)

        return te.compute(shape, body, name="qadd")

    return _emit_unfused(imp, compute, a, b, am, ash, bm, bsh, om, osh, name="qadd")


@register_converter("qlut.default")
def _qlut(node, imp):
    from tvm import relax

    x, table = _args(node, imp)
    idx = _emit(imp, relax.op.add(relax.op.astype(x, "int32"), relax.const(128, "int32")))
    return _emit(imp, relax.op.take(table, idx, axis=0))


@register_converter("qsign.default")
def _qsign(node, imp):
    from tvm import relax

    x, x_zp = _args(node, imp)
    ge = relax.op.greater_equal(relax.op.astype(x, "int32"), relax.const(x_zp, "int32"))
    return _emit(imp, relax.op.where(ge, relax.const(1, "int8"), relax.const(-1, "int8")))


@register_converter("quantize_sign.default")
def _quantize_sign(node, imp):
    from tvm import relax

    (x,) = _args(node, imp)
    ge = relax.op.greater_equal(x, relax.const(0.0, "float32"))
    return _emit(imp, relax.op.where(ge, relax.const(1, "int8"), relax.const(-1, "int8")))


@register_converter("unpack_bits.default")
def _unpack_bits(node, imp):
    import math

    import numpy as np
    from tvm import relax

    packed, bits, shape = _args(node, imp)
    per, n = 8 // bits, math.prod(shape)
    op, e = relax.op, lambda x: _emit(imp, x)
    column = e(op.reshape(e(op.astype(packed, "int32")), [-1, 1]))
    codes = e(op.bitwise_and(op.right_shift(column, relax.const(np.arange(per, dtype="int32") * bits)),
                             relax.const((1 << bits) - 1, "int32")))
    codes = e(op.strided_slice(e(op.reshape(codes, [-1])), axes=[0], begin=[0], end=[n]))
    if bits == 1:
        values = e(op.subtract(op.multiply(codes, relax.const(2, "int32")), relax.const(1, "int32")))
    else:
        sign = relax.const(1 << (bits - 1), "int32")
        values = e(op.subtract(op.bitwise_xor(codes, sign), sign))
    return e(op.astype(op.reshape(values, shape), "int8"))


# ---- PT2E quantize/dequantize (graph boundaries and patterns FoldQDQ declined), same fp32 formulas as torch

def _scalar_or_tensor(imp, v, dtype: str):
    from tvm import relax

    if isinstance(v, relax.Expr):
        return _emit(imp, relax.op.astype(v, dtype))
    return relax.const(v, dtype)


def _round_half_even(imp, v):
    """torch.round: nearest, ties to even (TVM's round goes away from zero)."""
    from tvm import relax

    op, e = relax.op, lambda x: _emit(imp, x)
    f = e(op.floor(v))
    d = e(op.subtract(v, f))
    half, one = relax.const(0.5, "float32"), relax.const(1.0, "float32")
    tie = e(op.add(f, op.floor_mod(f, relax.const(2.0, "float32"))))
    return e(op.where(op.greater(d, half), op.add(f, one), op.where(op.less(d, half), f, tie)))


def _quantize(imp, x, inv_scale, zp, qmin, qmax, dtype):
    from tvm import relax

    v = _round_half_even(imp, _emit(imp, relax.op.multiply(x, inv_scale)))
    y = relax.op.add(v, relax.op.astype(zp, "float32"))
    lo, hi = relax.const(float(qmin), "float32"), relax.const(float(qmax), "float32")
    return _emit(imp, relax.op.astype(relax.op.minimum(relax.op.maximum(y, lo), hi), _DTYPES[dtype]))


def _dequantize(imp, x, scale, zp, out_dtype):
    from tvm import relax

    shifted = relax.op.subtract(relax.op.astype(x, "float32"), relax.op.astype(zp, "float32"))
    return _emit(imp, relax.op.astype(relax.op.multiply(shifted, scale), _DTYPES.get(out_dtype, "float32")))


@register_converter("quantize_per_tensor.default")
@register_converter("quantize_per_tensor.tensor")
def _quantize_per_tensor(node, imp):
    from tvm import relax

    x, scale, zp, qmin, qmax, dtype = _args(node, imp)[:6]
    inv = (relax.const(1.0 / scale, "float32") if not isinstance(scale, relax.Expr)
           else _emit(imp, relax.op.divide(relax.const(1.0, "float32"), relax.op.astype(scale, "float32"))))
    return _quantize(imp, x, inv, _scalar_or_tensor(imp, zp, "int32"), qmin, qmax, dtype)


@register_converter("dequantize_per_tensor.default")
@register_converter("dequantize_per_tensor.tensor")
def _dequantize_per_tensor(node, imp):
    x, scale, zp = _args(node, imp)[:3]
    return _dequantize(imp, x, _scalar_or_tensor(imp, scale, "float32"), _scalar_or_tensor(imp, zp, "int32"),
                       node.kwargs.get("out_dtype") or torch.float32)


def _per_channel_params(node, imp, scales, zps, axis):
    from tvm import relax

    nd = _ndim(node)
    shape = [1] * nd
    shape[axis] = -1
    s = _emit(imp, relax.op.reshape(_emit(imp, relax.op.astype(scales, "float32")), shape))
    z = relax.const(0, "int32") if zps is None else _emit(
        imp, relax.op.reshape(_emit(imp, relax.op.astype(zps, "int32")), shape))
    return s, z


@register_converter("quantize_per_channel.default")
def _quantize_per_channel(node, imp):
    from tvm import relax

    x, scales, zps, axis, qmin, qmax, dtype = _args(node, imp)[:7]
    s, z = _per_channel_params(node, imp, scales, zps, axis)
    inv = _emit(imp, relax.op.divide(relax.const(1.0, "float32"), s))
    return _quantize(imp, x, inv, z, qmin, qmax, dtype)


@register_converter("dequantize_per_channel.default")
def _dequantize_per_channel(node, imp):
    x, scales, zps, axis = _args(node, imp)[:4]
    s, z = _per_channel_params(node, imp, scales, zps, axis)
    return _dequantize(imp, x, s, z, node.kwargs.get("out_dtype") or torch.float32)
