"""Converters from graphopt's integer operators (and PT2E's quantize/dequantize ops) to Relax.

`converters()` is the ``custom_convert_map`` for TVM's ``from_exported_program``: keys are the
importer's op names (``"qconv2d.default"``), values ``fn(node, importer) -> relax.Var``. Relax has
no qnn ops, so integer compute is plain ops with ``out_dtype`` — ``conv2d(int8, int8) → int32`` on
input padded with its zero point, plus one folded bias − zx·Σw constant — and requantization is the
gemmlowp fixed-point arithmetic of `graphopt.qops` written as elementwise int32 ops (one 64-bit
product), which layout conversion keeps channel-last and FuseOps fuses into the kernel epilogue. Every
converter reproduces the `graphopt.qops` contract bit for bit (rounding half to even where PyTorch does). Add more with
`register_converter`; it refuses (ConfigError) a name that is already registered.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from graphopt.errors import ConfigError
from graphopt.targets.lowering.importing import constant_value, import_target
from graphopt.targets.lowering.int8 import QUANTIZE_NHWC_ATTR

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


def _emit(imp, expr):
    return imp.block_builder.emit(expr)


def _constant(arg):
    value = constant_value(arg)
    if value is None:
        raise TypeError(f"{arg} must be a model constant (a buffer the quantization folding made)")
    return value


def _ndim(node) -> int:
    return node.meta["val"].dim()


def _channels(node) -> int:
    return int(node.meta["val"].shape[1])


def _fixed_point_multiply(imp, x, mults, shifts, const, bound: int | None = None):
    """MultiplyByQuantizedMultiplier of an int32 Relax tensor by compile-time (M0, shift) as Relax
    ops — elementwise, so layout conversion keeps them channel-last and FuseOps fuses them into the
    producing kernel's epilogue. Only the product is 64-bit:

        x = sat32(x ≪ left)                                  (int64 only where some left > 0)
        high = (x·M0 + 2^30) ≫ 31                             (= gemmlowp's SRDHM, nudge and truncation
                                                                folded into one floor shift; M0 > 0)
        y = (high ≫ right) + [(high & mask) > mask/2 + (high < 0)]    (RDBPOT, mask = 2^right − 1)

    With `bound` ≥ |x| known at compile time and (bound ≪ left) < 2^30 nothing can overflow, and
    the same values come from fewer operations (what Cortex-M's SMMULR and a 3-op rounding shift do):

        high = (2x·M0 + 2^31) ≫ 32                            (same floor: numerator and 2^31 doubled)
        y = (high + 2^(right−1) + (high ≫ 31)) ≫ right         (every right in 1..31; |high| ≤ |x| < 2^30)

    On aarch64 (`fixed_point.has_sqrdmulh`) both steps are written as SRDHM in the one int64 form
    that `fixed_point.use_sqrdmulh` turns into ``sqrdmulh`` after scheduling — the rounding shift as a
    product too, exact for every right in 1..31 (|high| < 2^31 − 1, so the fix-up cannot overflow):

        high = SRDHM(x, M0) = (x·M0 + 2^30) ≫ 31
        y = SRDHM(high + (high ≫ 31), 2^(31−right))   (= RDBPOT: rounds half away from zero)

    `const(values, dtype)` makes a constant broadcasting along the multiplier's axis."""
    import numpy as np
    from tvm import relax

    from graphopt.targets.lowering.fixed_point import has_sqrdmulh

    op, e = relax.op, lambda v: _emit(imp, v)
    left, right = np.maximum(shifts, 0), np.maximum(-shifts, 0)
    if has_sqrdmulh(import_target()) and (not right.any() or right.min() >= 1):
        if left.any():
            x = e(op.left_shift(x, const(left, "int32"))) if bound is not None \
                and (np.int64(bound) << left).max() < 2 ** 31 \
                else _saturate32(imp, op.left_shift(op.astype(x, "int64"), const(left, "int64")), const)
        high = e(_srdhm(x, mults, const))
        if not right.any():
            return high
        fixed = op.add(high, op.right_shift(high, const(31, "int32")))
        return e(_srdhm(fixed, np.int64(1) << (31 - right), const))
    if bound is not None and (np.int64(bound) << left).max() < 2 ** 30:
        doubled = e(op.left_shift(x, const(left + 1, "int32")))  # no saturation: |x ≪ left| < 2^30
        high = e(op.astype(op.right_shift(op.add(op.multiply(op.astype(doubled, "int64"), const(mults, "int64")),
                                                 const(1 << 31, "int64")), const(32, "int64")), "int32"))
        if not right.any():
            return high
        if right.min() >= 1 and right.max() <= 31:
            nudged = op.add(op.add(high, const(np.int64(1) << (right - 1), "int32")),
                            op.right_shift(high, const(31, "int32")))
            return e(op.right_shift(nudged, const(right, "int32")))
    else:
        if left.any():
            x = _saturate32(imp, op.left_shift(op.astype(x, "int64"), const(left, "int64")), const)
        product = op.multiply(op.astype(x, "int64"), const(mults, "int64"))
        high = e(op.astype(op.right_shift(op.add(product, const(1 << 30, "int64")), const(31, "int64")), "int32"))
    mask = (np.int64(1) << right) - 1
    threshold = op.add(op.astype(op.less(high, const(0, "int32")), "int32"), const(mask >> 1, "int32"))
    return e(op.add(op.right_shift(high, const(right, "int32")),
                    op.astype(op.greater(op.bitwise_and(high, const(mask, "int32")), threshold), "int32")))


def _srdhm(x, mults, const):
    """gemmlowp's SaturatingRoundingDoublingHighMul of an int32 Relax expression by int32 constants
    (< 2^31) as ``(x·M + 2^30) ≫ 31`` in int64: the form `fixed_point.use_sqrdmulh` recognizes."""
    from tvm import relax

    op = relax.op
    product = op.multiply(op.astype(x, "int64"), const(mults, "int64"))
    return op.astype(op.right_shift(op.add(product, const(1 << 30, "int64")), const(31, "int64")), "int32")


def _saturate32(imp, wide, const):
    """An int64 Relax expression clamped to the int32 range, as int32."""
    from tvm import relax

    op = relax.op
    return _emit(imp, op.astype(op.minimum(op.maximum(wide, const(-(2 ** 31), "int64")), const(2 ** 31 - 1, "int64")),
                                "int32"))


def _constants_along(nd: int, axis: int):
    """const(values, dtype): a scalar constant (also for values equal along the axis), or one shaped
    to broadcast along `axis` of rank `nd` (tensor operands go first in every binary op: a constant
    left operand makes layout conversion fall back to NCHW)."""
    import numpy as np
    from tvm import relax

    def const(values, dtype):
        v = np.asarray(values).astype(dtype)
        if v.size == 1 or (v == v.flat[0]).all():  # the same for every channel: an immediate in the kernel
            return relax.const(v.flat[0].item(), dtype)
        shape = [1] * nd
        shape[axis] = v.size
        return relax.const(v.reshape(shape), dtype)

    return const


def _saturate_int8(imp, y, out_zp: int, qmin: int, qmax: int, const):
    from tvm import relax

    op = relax.op
    y = op.add(y, const(out_zp, "int32"))
    return _emit(imp, op.astype(op.minimum(op.maximum(y, const(qmin, "int32")), const(qmax, "int32")), "int8"))


@register_converter("requantize.default")
def _requantize(node, imp):
    """`qops.requantize`: int32 accumulators to int8 through `_fixed_point_multiply`."""
    import numpy as np
    from tvm import relax

    acc, in_zp, _, _, axis, out_zp, qmin, qmax = _args(node, imp)
    mults, shifts = (_constant(a).astype(np.int64).reshape(-1) for a in node.args[2:4])
    const = _constants_along(_ndim(node), axis % _ndim(node))
    bound = _accumulator_bound(node.args[0])
    if in_zp:  # acc − in_zp may leave int32: saturate like the left shift does
        acc = _saturate32(imp, relax.op.subtract(relax.op.astype(acc, "int64"), const(in_zp, "int64")), const)
        bound = None if bound is None else bound + abs(in_zp)
    return _saturate_int8(imp, _fixed_point_multiply(imp, acc, mults, shifts, const, bound), out_zp, qmin, qmax,
                          const)


_ACCUMULATING = {"qconv2d", "qlinear"}


def _accumulator_bound(node) -> int | None:
    """A compile-time bound on |output| of a qconv2d/qlinear node: 255·Σ|w| + |bias| over the worst
    output channel (|x − zx| ≤ 255; weights that are not constants count as 128 each); 255² for
    qmul; 255·window for qsum_pool2d; else None."""
    import math

    import numpy as np

    if not (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and getattr(node.target, "namespace", None) == "graphopt"):
        return None
    if node.target._opname == "qmul":
        return 255 * 255
    if node.target._opname == "qsum_pool2d":
        return 255 * math.prod(node.args[2])
    if node.target._opname not in _ACCUMULATING:
        return None
    w, bias = node.args[2], node.args[3]
    w_np = constant_value(w)
    if w_np is not None:
        per_channel = np.abs(w_np.astype(np.int64)).reshape(w_np.shape[0], -1).sum(axis=1)
    else:
        shape = w.meta["val"].shape
        per_channel = np.full(int(shape[0]), 128 * math.prod(int(d) for d in shape[1:]), dtype=np.int64)
    b = np.zeros(1, np.int64) if bias is None else constant_value(bias)
    if b is None:
        return None
    return int((255 * per_channel + np.abs(b.astype(np.int64).reshape(-1))).max())


def _zp_times_weight_sum(imp, w, x_zp: int, axes: list[int]):
    """x_zp · Σ w over ``axes`` (int32): the zero-point term of Σ (x − zx)·w = Σ x·w − zx·Σ w."""
    from tvm import relax

    return _emit(imp, relax.op.multiply(relax.op.sum(relax.op.astype(w, "int32"), axis=axes),
                                        relax.const(x_zp, "int32")))


def _add_offset(imp, node, acc, w, bias, x_zp: int, axes: list[int], shape: list[int]):
    """acc + bias − zx·Σw. With constant weights and bias (the folded graph's buffers) that is ONE
    per-channel int32 constant computed here, one add in the kernel epilogue; else Relax ops."""
    import numpy as np
    from tvm import relax

    w_np = constant_value(node.args[2])
    b_np = None if node.args[3] is None else constant_value(node.args[3])
    if w_np is not None and (node.args[3] is None or b_np is not None):
        offset = -x_zp * w_np.astype(np.int64).sum(axis=tuple(axes))
        if b_np is not None:
            offset = offset + b_np.astype(np.int64).reshape(-1)
        if not offset.any():
            return acc
        if np.abs(offset).max() < 2 ** 31:
            return _emit(imp, relax.op.add(acc, relax.const(offset.astype(np.int32).reshape(shape), "int32")))
    if x_zp:
        acc = _emit(imp, relax.op.subtract(acc, relax.op.reshape(_zp_times_weight_sum(imp, w, x_zp, axes), shape)))
    return acc if bias is None else _emit(imp, relax.op.add(acc, relax.op.reshape(bias, shape)))


@register_converter("qconv2d.default")
def _qconv2d(node, imp):
    from tvm import relax

    from graphopt.targets.lowering import lowbit

    if (packed := lowbit.qconv2d(node, imp)) is not None:  # weights from unpack_bits: packed kernels
        return packed
    x, x_zp, w, bias, stride, padding, dilation, groups = _args(node, imp)
    w_np = constant_value(node.args[2])
    if (w_np is not None and w_np.shape[1:] == (1, 1, 1) and groups == w_np.shape[0] == _channels(node.args[0])
            and list(stride) == [1, 1] and not any(padding)):  # a per-channel scale (fold_qdq's integer affine):
        acc = _emit(imp, relax.op.multiply(relax.op.astype(x, "int32"),  # elementwise, fused with its neighbours
                                           relax.const(w_np.astype("int32").reshape(1, -1, 1, 1))))
        return _add_offset(imp, node, acc, w, bias, x_zp, [1, 2, 3], [1, -1, 1, 1])
    ph, pw = padding
    if ph or pw:  # pad with the zero point (real 0), then the conv itself needs no padding
        x = _emit(imp, relax.op.nn.pad(x, [0, 0, 0, 0, ph, ph, pw, pw], pad_value=float(x_zp)))
    acc = _emit(imp, relax.op.nn.conv2d(x, w, strides=stride, padding=0, dilation=dilation, groups=groups,
                                        out_dtype="int32"))
    return _add_offset(imp, node, acc, w, bias, x_zp, [1, 2, 3], [1, -1, 1, 1])


@register_converter("qlinear.default")
def _qlinear(node, imp):
    from tvm import relax

    from graphopt.targets.lowering import lowbit

    if (packed := lowbit.qlinear(node, imp)) is not None:  # weights from unpack_bits: packed kernels
        return packed
    x, x_zp, w, bias = _args(node, imp)
    acc = _emit(imp, relax.op.matmul(x, relax.op.permute_dims(w, [1, 0]), out_dtype="int32"))
    return _add_offset(imp, node, acc, w, bias, x_zp, [1], [-1])


@register_converter("qmatmul.default")
def _qmatmul(node, imp):
    from tvm import relax

    a, a_zp, b, b_zp = _args(node, imp)
    shifted = [_emit(imp, relax.op.subtract(relax.op.astype(t, "int32"), relax.const(z, "int32")))
               for t, z in ((a, a_zp), (b, b_zp))]
    return _emit(imp, relax.op.matmul(*shifted, out_dtype="int32"))


@register_converter("qmul.default")
def _qmul(node, imp):
    """(a − za)·(b − zb) in int32, broadcasting: elementwise, fused with the requantize after it."""
    from tvm import relax

    a, a_zp, b, b_zp = _args(node, imp)
    shifted = [_emit(imp, relax.op.subtract(relax.op.astype(t, "int32"), relax.const(z, "int32")))
               for t, z in ((a, a_zp), (b, b_zp))]
    return _emit(imp, relax.op.multiply(*shifted))


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
    """TFLite's quantized add: each side (x − zp) ≪ 20 rescaled, summed, rescaled to the output."""
    import numpy as np
    from tvm import relax

    from graphopt.qops import LEFT_SHIFT_ADD

    a, a_zp, _, _, b, b_zp, _, _, _, _, out_zp, qmin, qmax = _args(node, imp)
    params = [_constant(node.args[i]).astype(np.int64).reshape(-1) for i in (2, 3, 6, 7, 8, 9)]
    const = _constants_along(_ndim(node), 0)  # per-tensor multipliers: scalars

    spec = import_target()
    own_kernel = spec is not None and spec.ram_bytes is not None  # a RAM budget: the arena matters most

    def side(x, zp, m, s):
        if own_kernel:  # FuseOps fuses elementwise chains into their producer: after two convs, one
            # side's int32 rescale would be stored between kernels (4× the int8 bytes). A same-shape
            # reshape ends the producers' groups, so the add reads both int8 tensors in its own
            # kernel (layout conversion keeps it channel-first: a few transposes, cheap next to RAM)
            x = _emit(imp, relax.op.reshape(x, x.ty.shape))
        x = _emit(imp, relax.op.subtract(relax.op.astype(x, "int32"), const(zp, "int32")))
        return _fixed_point_multiply(imp, _emit(imp, relax.op.left_shift(x, const(LEFT_SHIFT_ADD, "int32"))), m, s,
                                     const, bound=255 << LEFT_SHIFT_ADD)

    # each side is at most its input bound ≪ its left shift (M0 < 2^31 and the right shift only shrink it)
    total_bound = sum((255 << LEFT_SHIFT_ADD) << int(max(s.max(), 0)) for s in (params[1], params[3]))
    total = _emit(imp, relax.op.add(side(a, a_zp, *params[0:2]), side(b, b_zp, *params[2:4])))
    return _saturate_int8(imp, _fixed_point_multiply(imp, total, *params[4:6], const, total_bound), out_zp, qmin,
                          qmax, const)


@register_converter("qlut.default")
def _qlut(node, imp):
    from tvm import relax

    x, table = _args(node, imp)
    idx = _emit(imp, relax.op.add(relax.op.astype(x, "int32"), relax.const(128, "int32")))
    return _emit(imp, relax.op.take(table, idx, axis=0, mode="clip"))  # idx is in [0, 255]; "fast" warns


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


_CLIP = 2.0 ** 30  # |x/scale| clipped here before rounding (int32 conversion), far outside 8/16-bit ranges
# ±1.5·2^23 as IEEE bits: for |a| ≤ 2^22, a + 1.5·2^23 lies in [2^23, 2^24], where float32's spacing is 1, so
# the sum is a rounded to an integer in the FPU's rounding mode (ties to even, the default) and subtracting
# 1.5·2^23 again is exact
_MAGIC_BITS = (0x4B400000, -0x34C00000)  # +1.5·2^23 and −1.5·2^23 as int32 bit patterns


QUANTIZE_ATTR = "graphopt.quantize"  # PrimFunc attribute of `_quantize`'s kernels: [qmin, qmax, rint]


def _floor(a, lanes: int = 1):
    """⌊a⌋ via truncation (one convert; no floorf call on FPUs without rounding ops)."""
    from tvm import tirx

    as_int = tirx.Cast("int32" if lanes == 1 else f"int32x{lanes}", a)
    t = tirx.Cast("float32" if lanes == 1 else f"float32x{lanes}", as_int)
    return t - tirx.Select(a < t, _f32(1.0, lanes), _f32(0.0, lanes))


def _f32(value: float, lanes: int = 1):
    from tvm import tirx

    return _lanes(tirx.const(value, "float32"), lanes)


def _lanes(c, lanes: int):
    """Scalar `c`, broadcast to `lanes` when more than one."""
    from tvm import tirx

    return c if lanes == 1 else tirx.Broadcast(c, lanes)


def _magic_round(a, lanes: int = 1):
    """round_half_even(a) for |a| ≤ 2^22 in two additions (`_MAGIC_BITS`); the constants are reinterpreted
    bits because TVM's simplifier folds (a + c) − c back to a."""
    from tvm import tirx

    plus, minus = (_lanes(tirx.reinterpret("float32", tirx.const(b, "int32")), lanes) for b in _MAGIC_BITS)
    return (a + plus) + minus


def _round_half_even(a, rint: bool, lanes: int = 1):
    from tvm import tirx

    if rint:
        return tirx.nearbyint(a)
    f = _floor(a, lanes)
    d = a - f
    parity = f - _floor(f * _f32(0.5, lanes), lanes) * _f32(2.0, lanes)
    return tirx.Select(d > _f32(0.5, lanes), f + _f32(1.0, lanes),
                       tirx.Select(d < _f32(0.5, lanes), f, f + parity))


def quantized(v, z, qmin: int, qmax: int, dtype: str, rint: bool, lanes: int = 1):
    """The quantized value of ``v = x · inv_scale`` (float32, `lanes` wide) with zero point ``z`` (float32):
    round_half_even(clip(v, ±2^30)) + z, clamped to [qmin, qmax], as `dtype` — `_quantize`'s formula, shared
    by `quantize_channel_last`'s kernel.

    With `rint` and an 8- or 16-bit range the ±2^30 clip is left out: ``nearbyint`` needs no integer
    conversion, every value the clip would change (beyond ±2^30, ±inf) clamps to the same bound without
    it, and NaN meets the same max/min either way. Saves 2 of ~9 vector instructions per 4 values on
    arm-a55 (a 3×32×32 input in `quantize_channel_last`'s kernel: 10,028 → 8,156). Without `rint`, an 8- or
    16-bit range is clamped first and rounded by `_magic_round` (two additions instead of a truncation,
    a convert back and parity selects: Cortex-M4, mobilenet_blocks' 3×32×32 input 166k → 59k instructions)."""
    from tvm import tirx

    out = dtype if lanes == 1 else f"{dtype}x{lanes}"
    narrow = max(abs(qmin), abs(qmax)) < 2 ** 16
    if narrow and not rint:  # clamp(rne(v) + z) = rne(clamp(v, qmin − z, qmax − z)) + z: z and the bounds are
        # integers and rne is monotone; the clamped v is within `_magic_round`'s ±2^22
        v = tirx.min(tirx.max(v, _f32(float(qmin), lanes) - z), _f32(float(qmax), lanes) - z)
        return tirx.Cast(out, _magic_round(v, lanes) + z)
    if not narrow:
        v = tirx.min(tirx.max(v, _f32(-_CLIP, lanes)), _f32(_CLIP, lanes))
    r = _round_half_even(v, rint, lanes)
    return tirx.Cast(out, tirx.min(tirx.max(r + z, _f32(float(qmin), lanes)), _f32(float(qmax), lanes)))


def _quantize(imp, x, inv_scale, zp, qmin, qmax, dtype):
    """round_half_even(x · inv_scale) + zp, clamped — one kernel, kept out of fusion (opaque): fused
    with the layout transpose and padding that follow a graph input it would run on the padded
    channel-last tensor, 3 scalar channels at a time, instead of vectorized along the width
    (`quantize_channel_last` writes that transpose in one vectorized kernel instead).
    Ties to even (torch.round; TVM's round goes away from zero): `nearbyint` (the default rounding
    mode) on targets with round-to-integral instructions (`Feature.FP_ROUND`); elsewhere (FPv4
    Cortex-M, ARMv7 NEON, target-neutral) by adding and subtracting 1.5·2^23 (`_magic_round`), or for
    ranges wider than 16 bits the parity f − 2·⌊f/2⌋ of f = ⌊v⌋, with ⌊⌋ by truncation — no libm call.
    Int32 outputs (|q| ≥ 2^30) are not exact here: quantize_per_tensor to int32 is not a graphopt pattern."""
    from tvm import te, topi

    from graphopt.targets.spec import Feature

    spec = import_target()
    rint = spec is not None and spec.has(Feature.FP_ROUND)

    def compute(x_t, inv_t, zp_t):
        v = topi.multiply(x_t, inv_t)
        shape = topi.add(v, topi.cast(zp_t, "float32")).shape  # the broadcast result shape
        v, z = topi.broadcast_to(v, shape), topi.broadcast_to(topi.cast(zp_t, "float32"), shape)
        return te.compute(shape, lambda *i: quantized(v(*i), z(*i), qmin, qmax, _DTYPES[dtype], rint),
                          name="quantize")

    bb = imp.block_builder
    out = bb.emit_te(compute, x, inv_scale, zp, primfunc_name_hint="quantize")
    gv = bb.lookup_binding(out).args[0]
    # kOpaque: not fused, see above
    bb.update_func(gv, bb.get()[gv].with_attrs({"op_pattern": 8, QUANTIZE_ATTR: [qmin, qmax, int(rint)]}))
    return out


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


_CHUNK = 8  # input pixels per vector step of `quantize_channel_last`'s kernel (two 4-lane float32 vectors)
_INTERLEAVED = 4  # at most this many channels: one interleaving store (aarch64 st2/st3/st4)


def _quantize_nhwc(shape, qmin: int, qmax: int, dtype: str, rint: bool, pad=(0, 0, 0, 0), value: int = 0):
    """A PrimFunc ``(x [n, c, h, w] float32, inv_scale (), zp () int32) → out [n, pt + h + pb, pl + w + pr, c]``
    computing `quantized` of every value in the channel-last layout, padded by `pad` = (pt, pb, pl, pr) with
    `value`: per row, `_CHUNK` pixels of each channel quantized as vectors and interleaved by one shuffle into
    one contiguous store; the row's last w mod `_CHUNK` pixels and the padding one value at a time. Scheduled
    here (parallel over rows) and opaque."""
    from tvm import tirx
    from tvm.script import tirx as T

    n, c, h, w = shape
    pt, pb, pl, pr = pad
    rows, width = pt + h + pb, pl + w + pr
    chunks, rest = divmod(w, _CHUNK)
    interleave = [ch * _CHUNK + i for i in range(_CHUNK) for ch in range(c)]

    def chunk(x, inv, zp, b, y, u):
        lanes = [quantized(x[b, ch, y, tirx.Ramp(u * _CHUNK, 1, _CHUNK)] * tirx.Broadcast(inv[()], _CHUNK),
                           tirx.Broadcast(tirx.Cast("float32", zp[()]), _CHUNK), qmin, qmax, dtype, rint, _CHUNK)
                 for ch in range(c)]
        return tirx.Shuffle(lanes, interleave)

    def quantized_value(x, inv, zp, b, ch, y, u):
        return quantized(x[b, ch, y, u] * inv[()], tirx.Cast("float32", zp[()]), qmin, qmax, dtype, rint)

    @T.prim_func(private=True, s_tir=True)
    def quantize_nhwc(x: T.Buffer((n, c, h, w), "float32"), inv: T.Buffer((), "float32"),  # type: ignore[valid-type]
                      zp: T.Buffer((), "int32"), out: T.Buffer((n, rows, width, c), dtype)):  # type: ignore[valid-type]
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8, QUANTIZE_NHWC_ATTR: True})
        with T.sblock("root"):
            for by in T.parallel(n * rows):
                if by % rows < pt or by % rows >= pt + h:
                    for u, ch in T.grid(width, c):
                        out[by // rows, by % rows, u, ch] = T.Cast(dtype, value)
                else:
                    for u, ch in T.grid(pl, c):
                        out[by // rows, by % rows, u, ch] = T.Cast(dtype, value)
                    for u in range(chunks):
                        out[by // rows, by % rows, pl + u * _CHUNK, T.ramp(0, 1, _CHUNK * c)] = chunk(
                            x, inv, zp, by // rows, by % rows - pt, u)
                    for u, ch in T.grid(rest, c):
                        out[by // rows, by % rows, pl + chunks * _CHUNK + u, ch] = quantized_value(
                            x, inv, zp, by // rows, ch, by % rows - pt, chunks * _CHUNK + u)
                    for u, ch in T.grid(pr, c):
                        out[by // rows, by % rows, pl + w + u, ch] = T.Cast(dtype, value)

    return quantize_nhwc


def quantize_channel_last(mod):
    """`mod` with each NCHW → NHWC transpose of a per-tensor `_quantize` kernel's output (a graph input
    quantized for a channel-last conv), or of a constant height/width pad of it, replaced by one kernel writing
    the padded channel-last layout (`_quantize_nhwc`): on arm-a55, mobilenet_blocks' 3×32×32 input took 35.5k
    instructions in the quantize and the pad + transpose kernels, 9.5k in this one (the pad folded into the
    stem conv instead, `int8.fuse_input_pads`, its re-layout cost 20.6k more). The quantization is `quantized`,
    bit for bit; only where it is written changes. Left alone: per-channel quantization, inputs with more than
    `_INTERLEAVED` channels, other transposes and pads."""
    import tvm
    from tvm import relax

    permute, pad, call_tir = (tvm.ir.Op.get(f"relax.{op}") for op in ("permute_dims", "nn.pad", "call_tir"))

    def bound(mutator, expr):
        return mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(permute) or call.attrs.axes is None \
                    or [int(a) for a in call.attrs.axes] != [0, 2, 3, 1]:
                return call
            widths, value, src = [0] * 8, 0.0, bound(self, call.args[0])
            if isinstance(src, relax.Call) and src.op.same_as(pad) and str(src.attrs.pad_mode) == "constant":
                widths, value, src = [int(v) for v in src.attrs.pad_width], float(src.attrs.pad_value), \
                    bound(self, src.args[0])  # NCHW (before, after) per axis
            if not (isinstance(src, relax.Call) and src.op.same_as(call_tir)):
                return call
            func = mod[src.args[0]]
            if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None or QUANTIZE_ATTR not in func.attrs:
                return call
            x, inv, zp = src.args[1].fields
            shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in (x.ty.shape or [])]
            if len(shape) != 4 or None in shape or shape[1] > _INTERLEAVED or str(x.ty.dtype) != "float32" \
                    or inv.ty.ndim != 0 or zp.ty.ndim != 0 or str(zp.ty.dtype) != "int32" \
                    or [int(d) for d in src.ty.shape] != shape or any(widths[:4]) or value != int(value):
                return call
            qmin, qmax, rint = (int(v) for v in func.attrs[QUANTIZE_ATTR])
            dtype = str(src.ty.dtype)
            pt, pb, pl, pr = widths[4:]
            gv = self.builder_.add_func(_quantize_nhwc(shape, qmin, qmax, dtype, bool(rint), (pt, pb, pl, pr),
                                                       int(value)), "quantize_nhwc")
            n, c, h, w = shape
            return relax.call_tir(gv, [x, inv, zp], relax.TensorType((n, pt + h + pb, pl + w + pr, c), dtype))

    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
