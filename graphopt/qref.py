"""Bit-exact numpy reference interpreter of graphopt's integer graphs (`graphopt.qops` contract).

`run(gm, inputs)` evaluates a folded fx graph node by node with numpy integer arithmetic written
independently of the PyTorch implementations (im2col + int64 matmul; binary × binary layers use
XNOR + popcount: dot = K − 2·popcount(a XOR w)). Graph-boundary quantize (inputs) and dequantize
(outputs) follow `quantized_decomposed`'s fp32 formulas. Refuses (`QuantizationError`) any other
float compute — a declined QDQ pattern or a weight-only layer has no integer reference — and ops it
does not know.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx

from graphopt import qops
from graphopt.errors import QuantizationError
from graphopt.passes._graph import get_attr_value

aten, qd, g = torch.ops.aten, torch.ops.quantized_decomposed, torch.ops.graphopt


def _mbqm(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """gemmlowp MultiplyByQuantizedMultiplier in int64 (SRDHM then RoundingDivideByPOT)."""
    acc, m0, shift = (np.asarray(a, dtype=np.int64) for a in (acc, m0, shift))
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    x = np.clip(acc * (np.int64(1) << left), qops.INT32_MIN, qops.INT32_MAX)
    ab = x * m0
    nudged = ab + np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    high = np.where(nudged >= 0, nudged // (1 << 31), -((-nudged) // (1 << 31)))  # truncating division
    mask = (np.int64(1) << right) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + (remainder > threshold)


def _channel(t: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    if t.size > 1:
        shape[axis] = t.size
    return t.astype(np.int64).reshape(shape)


def xnor_popcount_dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """a [M, K] and w [N, K] with values ±1: a·wᵀ = K − 2·popcount(bits(a) XOR bits(w))."""
    k = a.shape[1]
    pa, pw = np.packbits(a > 0, axis=1), np.packbits(w > 0, axis=1)  # zero-padded the same way: XOR 0
    diff = np.unpackbits(pa[:, None, :] ^ pw[None, :, :], axis=2).sum(axis=2, dtype=np.int64)
    return k - 2 * diff


def _dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact int64 a [M, K] · w [N, K]ᵀ, XNOR-popcount when both sides are binary."""
    if a.size and np.isin(a, (-1, 1)).all() and np.isin(w, (-1, 1)).all():
        return xnor_popcount_dot(a, w)
    return a.astype(np.int64) @ w.astype(np.int64).T


def _im2col(x: np.ndarray, kh, kw, stride, dilation) -> tuple[np.ndarray, int, int]:
    n, c, h, w = x.shape
    oh = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = np.empty((n, oh, ow, c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dilation[0], j * dilation[1]
            cols[..., i, j] = x[:, :, y0:y0 + stride[0] * oh:stride[0], x0:x0 + stride[1] * ow:stride[1]].transpose(
                0, 2, 3, 1)
    return cols, oh, ow


def qconv2d(x, x_zp, w, bias, stride, padding, dilation, groups):
    ph, pw = padding
    xs = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=x_zp) - x_zp
    o, cg, kh, kw = w.shape
    cols, oh, ow = _im2col(xs, kh, kw, stride, dilation)
    n = x.shape[0]
    out = np.empty((n, o, oh, ow), dtype=np.int64)
    og = o // groups
    for gi in range(groups):
        a = cols[:, :, :, gi * cg:(gi + 1) * cg].reshape(n * oh * ow, -1)
        wg = w[gi * og:(gi + 1) * og].reshape(og, -1)
        out[:, gi * og:(gi + 1) * og] = _dot(a, wg).reshape(n, oh, ow, og).transpose(0, 3, 1, 2)
    if bias is not None:
        out += bias.astype(np.int64).reshape(1, -1, 1, 1)
    return out.astype(np.int32)


def qlinear(x, x_zp, w, bias):
    a = x.astype(np.int64).reshape(-1, x.shape[-1]) - x_zp
    out = _dot(a, w)
    if bias is not None:
        out = out + bias.astype(np.int64)
    return out.reshape(*x.shape[:-1], w.shape[0]).astype(np.int32)


def qmatmul(a, a_zp, b, b_zp):
    return np.matmul(a.astype(np.int64) - a_zp, b.astype(np.int64) - b_zp).astype(np.int32)


def qmul(a, a_zp, b, b_zp):
    return ((a.astype(np.int64) - a_zp) * (b.astype(np.int64) - b_zp)).astype(np.int32)


def qsum_pool2d(x, x_zp, kernel, stride, padding):
    ph, pw = padding
    xs = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=x_zp) - x_zp
    cols, _, _ = _im2col(xs, kernel[0], kernel[1], stride, (1, 1))
    return cols.sum(axis=(4, 5)).transpose(0, 3, 1, 2).astype(np.int32)


def requantize(acc, in_zp, multiplier, shift, axis, out_zp, qmin, qmax):
    a = acc.astype(np.int64) - in_zp
    y = _mbqm(a, _channel(multiplier, axis, a.ndim), _channel(shift, axis, a.ndim)) + out_zp
    return np.clip(y, qmin, qmax).astype(np.int8)


def qadd(a, a_zp, a_mult, a_shift, b, b_zp, b_mult, b_shift, out_mult, out_shift, out_zp, qmin, qmax):
    left = np.int64(1) << qops.LEFT_SHIFT_ADD
    total = (_mbqm((a.astype(np.int64) - a_zp) * left, a_mult, a_shift)
             + _mbqm((b.astype(np.int64) - b_zp) * left, b_mult, b_shift))
    return np.clip(_mbqm(total, out_mult, out_shift) + out_zp, qmin, qmax).astype(np.int8)


def qlut(x, table):
    return table[x.astype(np.int64) + 128]


def qsign(x, x_zp):
    return np.where(x.astype(np.int32) >= x_zp, 1, -1).astype(np.int8)


def unpack_bits(packed, bits, shape):
    per = 8 // bits
    codes = (packed[:, None].astype(np.int64) >> (np.arange(per) * bits)) & ((1 << bits) - 1)
    codes = codes.reshape(-1)[:int(np.prod(shape))]
    sign = 1 << (bits - 1)
    values = codes * 2 - 1 if bits == 1 else (codes ^ sign) - sign
    return values.reshape(shape).astype(np.int8)


def _quantize_per_tensor(x, scale, zp, qmin, qmax, dtype):
    inv = np.float32(1.0 / scale)
    return np.clip(np.round(x.astype(np.float32) * inv) + zp, qmin, qmax).astype(np.int8)


def _dequantize_per_tensor(x, scale, zp, qmin, qmax, dtype, out_dtype=None):
    return ((x.astype(np.float32) - np.float32(zp)) * np.float32(scale)).astype(np.float32)


def _max_pool2d(x, kernel, stride=None, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    kernel = list(kernel) * (2 // len(kernel))
    stride = list(stride or kernel) * (2 // len(stride or kernel))
    padding = list(padding) * (2 // len(padding))
    dilation = list(dilation) * (2 // len(dilation))
    extra = []  # right/bottom padding ceil_mode adds: a last window may start inside the input or left padding
    for n, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation):
        span = n + 2 * p - d * (k - 1) - 1
        out = span // s + 1
        if ceil_mode and span % s and out * s < n + p:
            out += 1
        extra.append((out - 1) * s + d * (k - 1) + 1 - (n + 2 * p))
    lo = np.iinfo(x.dtype).min
    pads = [(p, p + max(e, 0)) for p, e in zip(padding, extra)]
    xp = np.pad(x, ((0, 0), (0, 0), *pads), constant_values=lo)
    cols, _, _ = _im2col(xp, kernel[0], kernel[1], stride, dilation)
    return cols.max(axis=(4, 5)).transpose(0, 3, 1, 2)


def _view(x, shape):
    return x.reshape(shape)


def _pad(x, pad, mode="constant", value=None):
    """torch's pad: ``pad`` holds (before, after) pairs from the last dimension backwards."""
    pairs = [(0, 0)] * (x.ndim - len(pad) // 2) + [tuple(pad[i:i + 2]) for i in range(0, len(pad), 2)][::-1]
    if mode == "constant":
        return np.pad(x, pairs, constant_values=value or 0)
    return np.pad(x, pairs, mode={"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode])


OPS = {
    g.qconv2d.default: qconv2d, g.qlinear.default: qlinear, g.qmatmul.default: qmatmul,
    g.qmul.default: qmul, g.qsum_pool2d.default: qsum_pool2d, g.requantize.default: requantize, g.qadd.default: qadd,
    g.qlut.default: qlut, g.qsign.default: qsign, g.unpack_bits.default: unpack_bits,
    qd.quantize_per_tensor.default: _quantize_per_tensor, qd.dequantize_per_tensor.default: _dequantize_per_tensor,
    aten.max_pool2d.default: _max_pool2d, aten.pad.default: _pad,
    aten.constant_pad_nd.default: lambda x, pad, value=0: _pad(x, pad, "constant", value),
    aten.view.default: _view, aten.reshape.default: _view, aten._unsafe_view.default: _view,
    aten.t.default: lambda x: x.T, aten.squeeze.dim: lambda x, d: np.squeeze(x, d) if x.shape[d] == 1 else x,
    aten.flatten.using_ints: lambda x, start=0, end=-1: x.reshape(
        *x.shape[:start], -1, *x.shape[end % x.ndim + 1:]),
    aten.permute.default: lambda x, dims: x.transpose(dims),
    aten.transpose.int: lambda x, a, b: np.swapaxes(x, a, b),
    aten.unsqueeze.default: lambda x, d: np.expand_dims(x, d), aten.select.int: lambda x, d, i: np.take(x, i, axis=d),
    aten.squeeze.dims: lambda x, dims: np.squeeze(x, tuple(d for d in dims if x.shape[d] == 1)),
    aten.cat.default: lambda xs, dim=0: np.concatenate(xs, axis=dim),
    aten.clamp.default: lambda x, lo=None, hi=None: np.clip(x, lo, hi).astype(x.dtype),
    aten.slice.Tensor: lambda x, dim=0, start=None, end=None, step=1: x[
        (slice(None),) * (dim % x.ndim) + (slice(start, end, step),)],
    aten.contiguous.default: lambda x: x, aten.clone.default: lambda x, **kw: x,
    # shape arithmetic of graphs captured with a symbolic batch
    aten.sym_size.int: lambda x, dim: x.shape[dim], operator.mul: operator.mul, operator.add: operator.add,
    operator.sub: operator.sub, operator.floordiv: operator.floordiv,
}


def run(gm: fx.GraphModule, inputs) -> list[np.ndarray]:
    """Evaluate the integer graph ``gm`` on ``inputs``; returns the flat outputs as numpy arrays."""
    env: dict = {}
    it = iter(inputs)

    def val(a):
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(val(x) for x in a)
        return a

    outputs = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            t = next(it)
            env[n] = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        elif n.op == "get_attr":
            env[n] = get_attr_value(gm, n.target).detach().cpu().numpy()
        elif n.op == "call_function":
            fn = OPS.get(n.target)
            if fn is None:
                name = getattr(n.target, "__name__", str(n.target))
                raise QuantizationError(f"node {n.name}: {name} has no integer reference (a declined QDQ pattern "
                                        "or float compute); only fully folded integer graphs are checked")
            env[n] = fn(*val(n.args), **val(n.kwargs))
        elif n.op == "output":
            outputs = val(n.args[0])
        else:
            raise QuantizationError(f"node {n.name}: {n.op} nodes are not part of an integer graph")
    flat = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [np.asarray(o) for o in flat]
