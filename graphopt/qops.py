"""graphopt's integer operators (`torch.ops.graphopt.*`), registered with `torch.library`.

Their PyTorch implementations ARE the integer semantics, so a folded fx graph runs bit-exactly
in PyTorch; `graphopt.qref` re-implements the same contract in numpy and
`graphopt.targets.converters` lowers it to Relax. Integers travel in int8 tensors (8-bit and
narrower values), accumulators in int32; requantization is gemmlowp/TFLite fixed point:

    requantize(acc) = clamp(RDBPOT(SRDHM(sat32(acc · 2^left), M0), right) + zp, qmin, qmax)

with ``M0`` an int32 in [2^30, 2^31) and ``shift`` = left − right (`quantize_multiplier`). It
rounds half away from zero (the fp32 QDQ form rounds half to even).

    qconv2d(x, zx, w, b)  = Σ (pad_zx(x) − zx)·w + b      int8 × int8 → int32 (bias int32)
    qlinear(x, zx, w, b)  = Σ_k (x − zx)·w[n, k] + b
    qmatmul(a, za, b, zb) = Σ_k (a − za)·(b − zb)
    qmul(a, za, b, zb)    = (a − za)·(b − zb)                  elementwise, broadcasting
    qsum_pool2d(x, zx)    = Σ_window (pad_zx(x) − zx)             (average pooling before requantize)
    qadd(a, b)            = TFLite's quantized add: both sides ≪ 20, rescaled, summed, requantized
                            (a − b: b's multiplier is negative; the rounding is symmetric)
    qlut(x, table)        = table[x + 128]                        (any unary op, exact vs. its QDQ form)
    unpack_bits(p, bits, shape) — low-bit weights stored packed, 8/bits values per byte, low bits first
    qsign(x, zx)          = +1 if x ≥ zx else −1                  (binary activations)
    quantize_sign(x)      = +1 if x ≥ 0 else −1 (float → int8; the QDQ form of a binary activation)

Against the fp32 QDQ form of the same op, fed the same int8 inputs, every op ending in a
requantize (or qadd) is within 1 output step: the exact result is rounded once, and besides ties
(half away from zero vs. half to even) only the int32 bias (rounded to the accumulator's unit),
the 31-bit multiplier and qadd's 2^-20 rescale move it, each far below one step. qlut and pure
data movement are exact. End to end these ≤ 1-step differences propagate through later layers
(README, "Quantization").

Each op also declares its cost (`cost(node)`: multiply-accumulates, the weight × activation
precision they run at, logical values of packed operands), which `graphopt.analysis` reads.

Accumulation runs in floating point, which is exact while every partial sum is an integer below
2^24 (float32, chosen when 255·128·K fits) or 2^53 (float64, any realistic K).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed

LEFT_SHIFT_ADD = 20  # TFLite's headroom for quantized add
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1

_qd = torch.ops.quantized_decomposed
QDQ_OPS = (_qd.quantize_per_tensor.default, _qd.quantize_per_tensor.tensor, _qd.dequantize_per_tensor.default,
           _qd.dequantize_per_tensor.tensor, _qd.quantize_per_channel.default, _qd.dequantize_per_channel.default)

_lib = torch.library.Library("graphopt", "DEF")
ops = torch.ops.graphopt


def quantize_multiplier(real: float, bound: int | None = None) -> tuple[int, int]:
    """``real`` ≈ M0 · 2^(shift − 31): TFLite's QuantizeMultiplier, M0 in [2^30, 2^31) (0 for tiny values).

    With ``bound`` ≥ |acc| known and an int8 result (clamped, so only |acc·real| < 2^9 matters), a
    multiplier below 1 may instead be M0 = round(real·2^31) with shift 0: SRDHM then rounds once, to
    the result, where the normalized form rounds twice — SRDHM to 2^-right of a step, then RDBPOT —
    and is up to ½·2^-right of a step off (¼ step when an int8 value is rescaled by ½…1). Taken when
    its error, |acc|·|M0·2^-31 − real|, is the smaller (every multiplier above ~2^-11 in practice)."""
    if not math.isfinite(real) or real < 0:
        raise ValueError(f"requantization multiplier must be finite and non-negative, got {real}")
    if real == 0.0:
        return 0, 0
    mantissa, exponent = math.frexp(real)
    m0 = round(mantissa * (1 << 31))
    if m0 == 1 << 31:
        m0, exponent = m0 // 2, exponent + 1
    if exponent < -31:
        return 0, 0
    if exponent > 30:
        raise ValueError(f"requantization multiplier {real} is too large for 32-bit fixed point")
    if bound is None or exponent >= 0:
        return m0, exponent
    acc = min(bound, 2 ** 9 / real)  # beyond, the int8 result saturates whatever the rounding
    single = round(real * (1 << 31))
    double_error = acc * abs(m0 * 2.0 ** (exponent - 31) - real) + 0.5 * 2.0 ** exponent
    if single >= 1 and acc * abs(single * 2.0 ** -31 - real) < double_error:
        return single, 0
    return m0, exponent


def multiplier_tensors(reals, bounds=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M0, shift) int32 tensors for ``reals``; ``bounds`` (one, or one per real): |acc| bounds that
    allow the single-rounding form (`quantize_multiplier`)."""
    reals = [float(r) for r in reals]
    bounds = bounds if isinstance(bounds, (list, tuple)) else [bounds] * len(reals)
    pairs = [quantize_multiplier(r, None if b is None else int(b)) for r, b in zip(reals, bounds)]
    return (torch.tensor([p[0] for p in pairs], dtype=torch.int32),
            torch.tensor([p[1] for p in pairs], dtype=torch.int32))


def _per_channel(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    if t.numel() > 1:
        shape[axis] = t.numel()
    return t.to(torch.int64).reshape(shape)


def mbqm(acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """MultiplyByQuantizedMultiplier on int64 tensors (m0, shift already broadcastable)."""
    left, right = shift.clamp(min=0), (-shift).clamp(min=0)
    x = (acc << left).clamp(INT32_MIN, INT32_MAX)
    ab = x * m0
    s = ab + torch.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = (s + ((s >> 63) & ((1 << 31) - 1))) >> 31  # division by 2^31 truncating toward zero
    mask = (1 << right) - 1
    threshold = (mask >> 1) + (high < 0).to(torch.int64)
    return (high >> right) + ((high & mask) > threshold).to(torch.int64)


@dataclass(frozen=True)
class OpCost:
    """What one call of a graphopt op costs, from its own definition.

    macs:           multiply-accumulates (elementwise work, rescaling and lookups count 0, as for float ops).
    precision:      the operand widths of those MACs, ``w<weight bits>a<activation bits>`` (``w8a8``,
                    ``w4a8``, ``w1a1`` …).
    operand_values: (argument index, logical values) of constant operands stored packed, whose
                    element count is not their value count (4/2/1-bit weights)."""

    macs: int = 0
    precision: str = ""
    operand_values: tuple[tuple[int, int], ...] = ()


COSTS: dict = {}  # OpOverload → cost(node) -> OpCost


def cost(node: fx.Node) -> OpCost | None:
    """The cost of a ``call_function`` node on a graphopt op (shapes from ``meta['tensor_meta']``,
    which ShapeProp sets, else ``meta['val']``), None for other nodes."""
    fn = COSTS.get(node.target) if node.op == "call_function" else None
    return fn(node) if fn is not None else None


def _shape(node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    meta = meta if meta is not None else node.meta["val"]
    return tuple(int(d) for d in meta.shape)


def _precision(x: fx.Node, w: fx.Node | None) -> str:
    """``w<bits>a<bits>`` of a layer reading activations ``x`` and weights ``w`` (None: two activations)."""
    wbits = w.args[1] if isinstance(w, fx.Node) and w.target is ops.unpack_bits.default else 8
    abits = 1 if isinstance(x, fx.Node) and x.target in (ops.qsign.default, ops.quantize_sign.default) else 8
    return f"w{wbits}a{abits}"


def _no_macs(node: fx.Node) -> OpCost:
    return OpCost()


def _define(schema: str, impl, fake, cost_of: Callable[[fx.Node], OpCost]) -> None:
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"graphopt::{name}", fake, lib=_lib)
    COSTS[getattr(ops, name).default] = cost_of


def _exact_dtype(k: int) -> torch.dtype:
    """Float type whose sums of k products of int8 values (|x − zx| ≤ 255, |w| ≤ 128) are exact."""
    return torch.float32 if 255 * 128 * k < 2 ** 24 else torch.float64


def _f64(t: torch.Tensor, zp: int = 0) -> torch.Tensor:
    return t.to(torch.float64) - zp


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.round().to(torch.int32)


def _pad(x: torch.Tensor, zp: int, padding, dtype=torch.float64) -> torch.Tensor:
    ph, pw = padding
    return torch.nn.functional.pad(x.to(dtype), (pw, pw, ph, ph), value=float(zp))


# ---- qconv2d
def _qconv2d(x, x_zp, w, bias, stride, padding, dilation, groups):
    dt = _exact_dtype(w[0].numel())
    y = torch.nn.functional.conv2d(_pad(x, x_zp, padding, dt) - x_zp, w.to(dt), None, stride, 0, dilation, groups)
    y = y.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64).reshape(1, -1, 1, 1)
    return _acc(y)


def _qconv2d_fake(x, x_zp, w, bias, stride, padding, dilation, groups):
    y = torch.nn.functional.conv2d(torch.empty(x.shape, dtype=torch.float32, device="meta"),
                                   torch.empty(w.shape, dtype=torch.float32, device="meta"),
                                   None, stride, padding, dilation, groups)
    return torch.empty(y.shape, dtype=torch.int32, device=x.device)


def _qconv2d_cost(n):  # every output: (Cin / groups)·KH·KW products
    return OpCost(math.prod(_shape(n)) * math.prod(_shape(n.args[2])[1:]), _precision(n.args[0], n.args[2]))


_define("qconv2d(Tensor x, int x_zp, Tensor w, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
        "int groups) -> Tensor", _qconv2d, _qconv2d_fake, _qconv2d_cost)


# ---- qlinear
def _qlinear(x, x_zp, w, bias):
    y = _f64(x, x_zp) @ _f64(w).t()
    return _acc(y if bias is None else y + bias.to(torch.float64))


def _qlinear_fake(x, x_zp, w, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.int32)


def _qlinear_cost(n):  # every output: in_features products
    return OpCost(math.prod(_shape(n)) * _shape(n.args[2])[-1], _precision(n.args[0], n.args[2]))


_define("qlinear(Tensor x, int x_zp, Tensor w, Tensor? bias) -> Tensor", _qlinear, _qlinear_fake, _qlinear_cost)


# ---- qmatmul
def _qmatmul(a, a_zp, b, b_zp):
    return _acc(torch.matmul(_f64(a, a_zp), _f64(b, b_zp)))


def _qmatmul_fake(a, a_zp, b, b_zp):
    y = torch.matmul(torch.empty(a.shape, device="meta"), torch.empty(b.shape, device="meta"))
    return a.new_empty(y.shape, dtype=torch.int32)


def _qmatmul_cost(n):  # every output: K products, K = last dim of a
    return OpCost(math.prod(_shape(n)) * _shape(n.args[0])[-1], _precision(n.args[0], None))


_define("qmatmul(Tensor a, int a_zp, Tensor b, int b_zp) -> Tensor", _qmatmul, _qmatmul_fake, _qmatmul_cost)


# ---- qmul
def _qmul(a, a_zp, b, b_zp):
    return ((a.to(torch.int32) - a_zp) * (b.to(torch.int32) - b_zp)).to(torch.int32)


def _qmul_fake(a, a_zp, b, b_zp):
    return a.new_empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.int32)


_define("qmul(Tensor a, int a_zp, Tensor b, int b_zp) -> Tensor", _qmul, _qmul_fake, _no_macs)  # elementwise


# ---- qsum_pool2d
def _qsum_pool2d(x, x_zp, kernel, stride, padding):
    xp = _pad(x, x_zp, padding) - x_zp
    ones = torch.ones((x.shape[1], 1, *kernel), dtype=torch.float64)
    return _acc(torch.nn.functional.conv2d(xp, ones, None, stride, 0, 1, x.shape[1]))


def _qsum_pool2d_fake(x, x_zp, kernel, stride, padding):
    y = torch.nn.functional.avg_pool2d(torch.empty(x.shape, device="meta"), kernel, stride, padding)
    return x.new_empty(y.shape, dtype=torch.int32)


_define("qsum_pool2d(Tensor x, int x_zp, int[] kernel, int[] stride, int[] padding) -> Tensor",
        _qsum_pool2d, _qsum_pool2d_fake, _no_macs)  # additions only, like float average pooling


# ---- requantize
def _requantize(acc, in_zp, multiplier, shift, axis, out_zp, qmin, qmax):
    a = acc.to(torch.int64) - in_zp
    y = mbqm(a, _per_channel(multiplier, axis, a.dim()), _per_channel(shift, axis, a.dim())) + out_zp
    return y.clamp(qmin, qmax).to(torch.int8)


def _requantize_fake(acc, in_zp, multiplier, shift, axis, out_zp, qmin, qmax):
    return acc.new_empty(acc.shape, dtype=torch.int8)


_define("requantize(Tensor acc, int in_zp, Tensor multiplier, Tensor shift, int axis, int out_zp, int qmin, "
        "int qmax) -> Tensor", _requantize, _requantize_fake, _no_macs)


# ---- qadd
def _qadd(a, a_zp, a_mult, a_shift, b, b_zp, b_mult, b_shift, out_mult, out_shift, out_zp, qmin, qmax):
    def side(x, zp, m, s):
        return mbqm((x.to(torch.int64) - zp) << LEFT_SHIFT_ADD, m.to(torch.int64), s.to(torch.int64))

    total = side(a, a_zp, a_mult, a_shift) + side(b, b_zp, b_mult, b_shift)
    y = mbqm(total, out_mult.to(torch.int64), out_shift.to(torch.int64)) + out_zp
    return y.clamp(qmin, qmax).to(torch.int8)


def _qadd_fake(a, a_zp, a_mult, a_shift, b, b_zp, b_mult, b_shift, out_mult, out_shift, out_zp, qmin, qmax):
    return a.new_empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.int8)


_define("qadd(Tensor a, int a_zp, Tensor a_mult, Tensor a_shift, Tensor b, int b_zp, Tensor b_mult, "
        "Tensor b_shift, Tensor out_mult, Tensor out_shift, int out_zp, int qmin, int qmax) -> Tensor",
        _qadd, _qadd_fake, _no_macs)


# ---- qlut
def _qlut(x, table):
    return table[x.to(torch.int64) + 128]


def _qlut_fake(x, table):
    return x.new_empty(x.shape, dtype=torch.int8)


_define("qlut(Tensor x, Tensor table) -> Tensor", _qlut, _qlut_fake, _no_macs)


# ---- qsign
def _qsign(x, x_zp):
    return torch.where(x.to(torch.int32) >= x_zp, 1, -1).to(torch.int8)


def _qsign_fake(x, x_zp):
    return x.new_empty(x.shape, dtype=torch.int8)


_define("qsign(Tensor x, int x_zp) -> Tensor", _qsign, _qsign_fake, _no_macs)


def _quantize_sign(x):
    return torch.where(x >= 0, 1, -1).to(torch.int8)


_define("quantize_sign(Tensor x) -> Tensor", _quantize_sign, lambda x: x.new_empty(x.shape, dtype=torch.int8),
        _no_macs)


# ---- unpack_bits
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 values of ``bits`` ∈ {1, 2, 4} into uint8, low bits first (1 bit: −1 → 0, +1 → 1)."""
    flat = values.reshape(-1).to(torch.int64)
    codes = (flat > 0).to(torch.int64) if bits == 1 else flat & ((1 << bits) - 1)
    per = 8 // bits
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % per)).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return (codes << shifts).sum(dim=1).to(torch.uint8)


def _unpack_bits(packed, bits, shape):
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = ((packed.to(torch.int64).unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)
    sign = 1 << (bits - 1)
    values = codes * 2 - 1 if bits == 1 else (codes ^ sign) - sign
    return values[:math.prod(shape)].reshape(shape).to(torch.int8)


def _unpack_bits_fake(packed, bits, shape):
    return packed.new_empty(shape, dtype=torch.int8)


def _unpack_bits_cost(n):  # the packed operand holds prod(shape) weights
    return OpCost(operand_values=((0, math.prod(n.args[2])),))


_define("unpack_bits(Tensor packed, int bits, int[] shape) -> Tensor", _unpack_bits, _unpack_bits_fake,
        _unpack_bits_cost)

