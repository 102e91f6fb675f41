"""Packed low-bit kernels for `qconv2d`/`qlinear` whose weights come from ``unpack_bits`` (1, 2, 4 bits).

Two kernel families, emitted with ``importer.block_builder`` from the converters of
`graphopt.targets.lowering.converters` (contract: `graphopt.qops`, bit-exact):

- **int8 activations × packed weights** (int4/int2, and 1-bit weights with 8-bit activations): the
  weight constant stays the packed uint8 bytes of ``unpack_bits`` (8/bits values per byte, low bits
  first) and every weight is decoded inside the reduction (shift, mask, ``(code ^ s) − s`` or
  ``2·bit − 1``); the zero-point term zx·Σw is folded into the bias at compile time, the input is
  padded with zx, int32 accumulation. NCHW / [M, N] computes, scheduled by graphopt's rules.
- **binary (a1w1)**, ``qconv2d(qsign(x, zx), 0, unpack_bits(w, 1, ...))`` and the same for
  ``qlinear``: a packing kernel turns ``x ≥ zx`` into channel words (`word_for`: 32-bit with
  AVX-512 VPOPCNTDQ, else 16-bit; the sign is fused, the ±1 int8 tensor is never built; when the
  int8 input is a ``quantize_per_tensor`` used only there, the quantize is folded too and the
  packing compares the float input with the exact rounding edge), weights are packed into the same words
  in numpy, and the kernel computes
  ``T − 2·popcount(a XOR w)``. Padded channel bits are 0 in both operands (XOR 0: they add
  nothing); spatial padding is packed as bit 0 (−1) and corrected exactly by the compile-time table
  ``T[row class, column class, f] = C·KH·KW + bias[f] + Σ_{window taps in the padding} Σ_c w``.
  These kernels are scheduled here (register tile of `MAX_COLS` output columns × `F_TILE` output
  channels, parallel over output rows, popcount vectorized over output channels: on AVX-512 one
  ``vpbroadcastd`` per activation word feeds four ``vpxord/vpopcntd/vpaddd`` lines, on NEON 16
  accumulators + 8 weight registers), marked ``tirx.is_scheduled`` and opaque so FuseOps keeps
  them whole.

Grouped binary convolutions take the first family (their ±1 int8 activations times 1-bit weights).
Declines (returns None, and the converter falls back to unpacking to int8 weights): weights or bias
that are not parameters/buffers of the program, ``qlinear`` inputs that are not 2-D, and sums that
do not fit int32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphopt.targets.lowering.importing import constant_value, import_target
from graphopt.targets.spec import Feature


@dataclass(frozen=True)
class Word:
    """The channel words of the binary kernels: `bits` channels per `dtype` value."""

    dtype: str
    bits: int

    def count(self, channels: int) -> int:
        return -(-channels // self.bits)

    def acc_dtype(self, words: int) -> str:
        """Popcount accumulators as wide as the words while the count fits (NEON: cnt + uadalp)."""
        return self.dtype if words * self.bits < 1 << self.bits else "int32"


WORD16 = Word("uint16", 16)  # NEON cnt + uadalp; the default
WORD32 = Word("uint32", 32)  # AVX-512 VPOPCNTDQ: vpopcntd, XOR with a broadcast word (measured 15% faster)


def word_for(spec) -> Word:
    """The binary kernels' word on `spec` (None: the default)."""
    return WORD32 if spec is not None and spec.has(Feature.AVX512_VPOPCNTDQ) else WORD16

F_TILE = 64  # output channels per register tile of the binary kernels (2 zmm of uint16, 8 NEON q)
MAX_COLS = 2  # output columns per register tile of the binary conv (NEON: 16 accumulators + 8 weights)

_UNPACK = torch.ops.graphopt.unpack_bits.default
_QSIGN = torch.ops.graphopt.qsign.default
_QUANT = torch.ops.quantized_decomposed.quantize_per_tensor.default


def _weights(node, imp):
    """(packed uint8, bits, shape, int8 values) of the ``unpack_bits`` weight of `node`, or None."""
    w = node.args[2]
    if not (isinstance(w, torch.fx.Node) and w.op == "call_function" and w.target is _UNPACK):
        return None
    packed, bits, shape = w.args
    data = constant_value(packed)
    if data is None:
        return None
    shape = [int(s) for s in shape]
    values = torch.ops.graphopt.unpack_bits(torch.from_numpy(data.copy()), int(bits), shape).numpy()
    return data, int(bits), shape, values


def _bias(node, imp, f: int) -> np.ndarray | None:
    bias = node.args[3]
    if bias is None:
        return np.zeros(f, np.int64)
    data = constant_value(bias)
    return None if data is None else data.astype(np.int64).reshape(f)


def _binary_input(node, imp, x_zp: int, bits: int):
    """(tensor, sign test) when `node` multiplies ±1 activations by 1-bit weights: the sign test maps
    a TIR value of the tensor to ``qsign``'s ``x ≥ threshold``. The tensor is the int8 input of qsign,
    or the float input of its ``quantize_per_tensor`` when qsign is that quantize's only user (the
    test is then made on the float directly, see `_quantized_at_least`, and the quantize is dead)."""
    src = node.args[0]
    if bits != 1 or x_zp != 0 or not (isinstance(src, torch.fx.Node) and src.target is _QSIGN):
        return None
    q, thr = src.args[0], int(src.args[1])
    if q.meta["val"].dtype != torch.int8:
        return None
    if isinstance(q, torch.fx.Node) and q.target is _QUANT and len(q.users) == 1:
        x, scale, zp, qmin, qmax, dtype = q.args[:6]
        if (isinstance(x, torch.fx.Node) and x in imp.env and x.meta["val"].dtype == torch.float32
                and isinstance(scale, float) and all(isinstance(v, int) for v in (zp, qmin, qmax))
                and dtype == torch.int8):
            return imp.env[x], _quantized_at_least(scale, zp, qmin, qmax, thr)
    from tvm import tirx

    return imp.env[q], lambda v: v >= tirx.const(thr, "int8")


def _quantized_at_least(scale: float, zp: int, qmin: int, qmax: int, thr: int):
    """Sign test on float x for ``clamp(round_half_even(x · f32(1/scale)) + zp, qmin, qmax) ≥ thr``
    (torch's quantize_per_tensor, then qsign), as one exact float compare: round(y) ≥ k ⇔ y > k − ½,
    or y = k − ½ when that tie rounds to k (k even)."""
    from tvm import tirx

    inv = tirx.const(float(np.float32(1.0 / scale)), "float32")
    if thr <= qmin or thr > qmax:
        return lambda v: tirx.const(thr <= qmin, "bool")
    k = thr - zp
    edge = tirx.const(k - 0.5, "float32")
    return (lambda v: v * inv >= edge) if k % 2 == 0 else (lambda v: v * inv > edge)


def _i32(values: np.ndarray) -> np.ndarray | None:
    return values.astype(np.int32) if np.abs(values).max(initial=0) < 2 ** 31 else None


def _emit_scheduled(imp, func, args, out_sinfo, name: str):
    """Add a hand-scheduled PrimFunc (opaque, so FuseOps leaves it whole) and call it."""
    from tvm import relax

    bb = imp.block_builder
    gv = bb.add_func(func.without_attr("global_symbol").with_attrs({"tirx.is_scheduled": True, "op_pattern": 8}),
                     name)
    return bb.emit(relax.call_tir(gv, args, out_sinfo))


def _decode(code, bits: int):
    from tvm import tirx

    if bits == 1:
        return code * 2 - 1
    sign = tirx.const(1 << (bits - 1), "int32")
    return (code ^ sign) - sign


def _weight_at(wp, flat, bits: int):
    """Value number `flat` (int32 TIR) of the packed uint8 buffer `wp`, decoded to int32."""
    from tvm import tirx

    per = 8 // bits
    byte = wp[flat // per].astype("int32")
    return _decode((byte >> ((flat % per) * bits)) & tirx.const((1 << bits) - 1, "int32"), bits)


# ---- int8 activations × packed weights

def qconv2d(node, imp):
    """Lower ``qconv2d(x, zx, unpack_bits(w), ...)`` to a packed-weight kernel, or None to decline."""
    weights = _weights(node, imp)
    if weights is None:
        return None
    packed, bits, (f, cg, kh, kw), values = weights
    x, x_zp, _, _, stride, padding, dilation, groups = imp.retrieve_args(node)
    b = _bias(node, imp, f)
    if b is None:
        return None
    binary = _binary_input(node, imp, int(x_zp), bits)
    if binary is not None and groups == 1:
        return _binary_conv2d(imp, *binary, values, b, [int(s) for s in stride], [int(p) for p in padding],
                              [int(d) for d in dilation])
    b = _i32(b - int(x_zp) * values.reshape(f, -1).astype(np.int64).sum(1))
    if b is None:
        return None
    return _packed_conv2d(imp, x, int(x_zp), packed, bits, (f, cg, kh, kw), b, [int(s) for s in stride],
                          [int(p) for p in padding], [int(d) for d in dilation], int(groups))


def qlinear(node, imp):
    """Lower ``qlinear(x, zx, unpack_bits(w), b)`` to a packed-weight kernel, or None to decline."""
    weights = _weights(node, imp)
    if weights is None or node.args[0].meta["val"].dim() != 2:
        return None
    packed, bits, (n, k), values = weights
    x, x_zp, _, _ = imp.retrieve_args(node)
    b = _bias(node, imp, n)
    if b is None:
        return None
    binary = _binary_input(node, imp, int(x_zp), bits)
    if binary is not None:
        return _binary_dense(imp, *binary, values, b)
    b = _i32(b - int(x_zp) * values.astype(np.int64).sum(1))
    return None if b is None else _packed_dense(imp, x, packed, bits, n, k, b)


def _packed_conv2d(imp, x, x_zp, packed, bits, wshape, bias, stride, padding, dilation, groups):
    from tvm import relax, te, topi

    f, cg, kh, kw = wshape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation

    def compute(x_t, wp, b_t):
        n, _, h, w = (int(d) for d in x_t.shape)
        xp = topi.nn.pad(x_t, [0, 0, ph, pw], [0, 0, ph, pw], pad_value=x_zp, name="pad_zp") if ph or pw else x_t
        oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        rc, ry, rx = te.reduce_axis((0, cg), "rc"), te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
        per_group = f // groups

        def body(i, o, y, xx):
            cin = rc if groups == 1 else o // per_group * cg + rc
            a = xp[i, cin, y * sh + ry * dh, xx * sw + rx * dw].astype("int32")
            return te.sum(a * _weight_at(wp, ((o * cg + rc) * kh + ry) * kw + rx, bits), axis=[rc, ry, rx])

        acc = te.compute((n, f, oh, ow), body, name="packed_conv2d")
        return te.compute(acc.shape, lambda i, o, y, xx: acc[i, o, y, xx] + b_t[o], name="bias_add")

    return imp.block_builder.emit_te(compute, x, relax.const(packed), relax.const(bias),
                                     primfunc_name_hint=f"conv2d_w{bits}")


def _packed_dense(imp, x, packed, bits, n, k, bias):
    from tvm import relax, te

    def compute(x_t, wp, b_t):
        r = te.reduce_axis((0, k), "k")
        acc = te.compute((int(x_t.shape[0]), n), lambda m, o: te.sum(
            x_t[m, r].astype("int32") * _weight_at(wp, o * k + r, bits), axis=r), name="packed_dense")
        return te.compute(acc.shape, lambda m, o: acc[m, o] + b_t[o], name="bias_add")

    return imp.block_builder.emit_te(compute, x, relax.const(packed), relax.const(bias),
                                     primfunc_name_hint=f"dense_w{bits}")


# ---- binary (a1w1)

def pack_words(signs: np.ndarray, word: Word = WORD16) -> np.ndarray:
    """±1 values [..., C] → words [..., ⌈C/bits⌉] (bit c % bits of word c // bits is 1 for +1; pad bits 0)."""
    c = signs.shape[-1]
    cw = word.count(c)
    bits = np.zeros((*signs.shape[:-1], cw * word.bits), np.uint64)
    bits[..., :c] = signs > 0
    bits = bits.reshape(*signs.shape[:-1], cw, word.bits) << np.arange(word.bits, dtype=np.uint64)
    return bits.sum(-1).astype(word.dtype)


def _pack_bits_expr(read, c: int, j, sign, word: Word):
    """One activation word: bit b is ``sign(read(channel))`` for channel j·bits + b < c (else 0)."""
    from tvm import tirx

    value = tirx.const(0, word.dtype)
    for b in range(word.bits):
        ch = j * word.bits + b
        valid = sign(read(tirx.min(ch, c - 1)))
        if c % word.bits and b >= c % word.bits:
            valid = tirx.all(valid, ch < c)
        value = value | tirx.Select(valid, tirx.const(1 << b, word.dtype), tirx.const(0, word.dtype))
    return value


def _pack_activation_func(shape, dtype: str, sign, pad: tuple[int, int], word: Word):
    """PrimFunc: NCHW → words [N, H+2ph, ⌈C/bits⌉, W+2pw] (bit: `sign`), padding packed as 0 bits."""
    from tvm import s_tir, te, topi

    n, c, h, w = shape
    ph, pw = pad
    x = te.placeholder(shape, dtype, name="x")
    words = te.compute((n, h, word.count(c), w),
                       lambda i, y, j, xx: _pack_bits_expr(lambda ch: x[i, ch, y, xx], c, j, sign, word),
                       name="pack_bits")
    out = topi.nn.pad(words, [0, ph, 0, pw], [0, ph, 0, pw], pad_value=0, name="pad_words")
    from graphopt.targets.lowering.schedules import schedule_spatial

    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    for name in ("pack_bits", "pad_words"):
        schedule_spatial(sch, sch.get_sblock(name), 8)  # vectors of up to 16 words
    return sch.mod["main"]


def _border_table(values: np.ndarray, bias: np.ndarray, hw, stride, padding, dilation):
    """(T [row class, column class, F] int32, row class [OH], column class [OW]) for the binary conv."""
    _, c, kh, kw = values.shape
    wsum = values.astype(np.int64).sum(1)  # [F, KH, KW]

    def classes(size, k, s, p, d):
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        masks = [tuple(not 0 <= o * s + t * d - p < size for t in range(k)) for o in range(out)]
        uniq = sorted(set(masks))
        return np.array([uniq.index(m) for m in masks], np.int32), np.array(uniq, bool).reshape(len(uniq), k)

    hcls, hmask = classes(hw[0], kh, stride[0], padding[0], dilation[0])
    wcls, wmask = classes(hw[1], kw, stride[1], padding[1], dilation[1])
    outside = hmask[:, None, :, None] | wmask[None, :, None, :]  # [HC, WC, KH, KW]
    corr = np.einsum("abyx,fyx->abf", outside.astype(np.int64), wsum)
    return _i32(c * kh * kw + bias[None, None, :] + corr), hcls, wcls


def _binary_conv_func(xshape, wpshape, f: int, out_hw, kernel, stride, dilation, tables, word: Word):
    from tvm import s_tir, te, tirx

    n, _, cw, _ = xshape
    fo_n, kh, kw, _, ft = wpshape
    oh, ow = out_hw
    (sh, sw), (dh, dw) = stride, dilation
    xp = te.placeholder(xshape, word.dtype, name="xp")
    wp = te.placeholder(wpshape, word.dtype, name="wp")
    tab, hc, wc = (te.placeholder(t.shape, "int32", name=nm)
                   for t, nm in zip(tables, ("table", "hcls", "wcls"), strict=True))
    ry, rx, rc = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, cw), "rc")
    acc_t = word.acc_dtype(kh * kw * cw)
    acc = te.compute((n, oh, ow, fo_n * ft), lambda i, y, x, o: te.sum(tirx.popcount(
        xp[i, y * sh + ry * dh, rc, x * sw + rx * dw] ^ wp[o // ft, ry, rx, rc, o % ft]).astype(acc_t),
        axis=[ry, rx, rc]), name="xnor_popcount")
    out = te.compute((n, f, oh, ow), lambda i, o, y, x: tab[hc[y], wc[x], o] - acc[i, y, x, o].astype("int32") * 2,
                     name="binary_conv2d")
    sch = s_tir.Schedule(te.create_prim_func([xp, wp, tab, hc, wc, out]))
    main, epi = sch.get_sblock("xnor_popcount"), sch.get_sblock("binary_conv2d")
    i, y, x, o, ry, rx, rc = sch.get_loops(main)
    cols = max(d for d in range(1, MAX_COLS + 1) if ow % d == 0)
    xo, xi = sch.split(x, [None, cols])
    fo, fi = sch.split(o, [None, ft])
    sch.reorder(i, y, fo, xo, ry, rx, rc, xi, fi)
    sch.parallel(sch.fuse(i, y))
    sch.reverse_compute_at(epi, xo, preserve_unit_loops=True)
    sch.unroll(xi)
    sch.vectorize(fi)
    sch.decompose_reduction(main, ry)
    return sch.mod["main"]


def _pack_weights(values: np.ndarray, word: Word) -> np.ndarray:
    """±1 weights [F, C, KH, KW] → words [⌈F/F_TILE⌉, KH, KW, CW, F_TILE] (padded channels: 0 words)."""
    f, c, kh, kw = values.shape
    fpad, cw = -(-f // F_TILE) * F_TILE, word.count(c)
    wpk = np.zeros((fpad, kh, kw, cw), word.dtype)
    wpk[:f] = pack_words(values.transpose(0, 2, 3, 1), word)
    return np.ascontiguousarray(wpk.reshape(fpad // F_TILE, F_TILE, kh, kw, cw).transpose(0, 2, 3, 4, 1))


def _binary_conv2d(imp, x, sign, values, bias, stride, padding, dilation):
    from tvm import relax

    f, c, kh, kw = values.shape
    n, _, h, w = (int(d) for d in x.ty.shape)
    ph, pw = padding
    word = word_for(import_target())
    xshape = (n, h + 2 * ph, word.count(c), w + 2 * pw)
    words = _emit_scheduled(imp, _pack_activation_func((n, c, h, w), x.ty.dtype, sign, padding, word), [x],
                            relax.TensorType(xshape, word.dtype), "pack_bits_nchw")
    wpk = _pack_weights(values, word)
    tables = _border_table(values, bias, (h, w), stride, padding, dilation)
    if tables[0] is None:
        return None
    oh, ow = (int(d) for d in tables[1].shape + tables[2].shape)
    func = _binary_conv_func(xshape, wpk.shape, f, (oh, ow), (kh, kw), stride, dilation, tables, word)
    return _emit_scheduled(imp, func, [words, relax.const(wpk), *(relax.const(t) for t in tables)],
                           relax.TensorType((n, f, oh, ow), "int32"), "binary_conv2d")


def _binary_dense_func(m: int, k: int, dtype: str, sign, wpshape, n_out: int, word: Word):
    from tvm import s_tir, te, tirx

    fo_n, kw, ft = wpshape
    x = te.placeholder((m, k), dtype, name="x")
    wp = te.placeholder(wpshape, word.dtype, name="wp")
    tab = te.placeholder((n_out,), "int32", name="table")
    words = te.compute((m, kw), lambda i, j: _pack_bits_expr(lambda ch: x[i, ch], k, j, sign, word), name="pack_bits")
    r = te.reduce_axis((0, kw), "r")
    acc = te.compute((m, fo_n * ft), lambda i, o: te.sum(
        tirx.popcount(words[i, r] ^ wp[o // ft, r, o % ft]).astype(word.acc_dtype(kw)), axis=r), name="xnor_popcount")
    out = te.compute((m, n_out), lambda i, o: tab[o] - acc[i, o].astype("int32") * 2, name="binary_dense")
    sch = s_tir.Schedule(te.create_prim_func([x, wp, tab, out]))
    main = sch.get_sblock("xnor_popcount")
    i, o, r = sch.get_loops(main)
    fo, fi = sch.split(o, [None, ft])
    sch.reorder(i, fo, r, fi)
    sch.parallel(sch.fuse(i, fo))
    sch.reverse_compute_at(sch.get_sblock("binary_dense"), sch.get_loops(main)[0], preserve_unit_loops=True)
    sch.vectorize(fi)
    sch.decompose_reduction(main, r)
    return sch.mod["main"]


def _binary_dense(imp, x, sign, values, bias):
    from tvm import relax

    n_out, k = values.shape
    m = int(x.ty.shape[0])
    table = _i32(k + bias)
    if table is None:
        return None
    word = word_for(import_target())
    npad = -(-n_out // F_TILE) * F_TILE
    kw = word.count(k)
    wpk = np.zeros((npad, kw), word.dtype)
    wpk[:n_out] = pack_words(values, word)
    wpk = np.ascontiguousarray(wpk.reshape(npad // F_TILE, F_TILE, kw).transpose(0, 2, 1))
    func = _binary_dense_func(m, k, x.ty.dtype, sign, wpk.shape, n_out, word)
    return _emit_scheduled(imp, func, [x, relax.const(wpk), relax.const(table)],
                           relax.TensorType((m, n_out), "int32"), "binary_dense")

