"""Tensorized int8 conv2d and dense: weights packed at compile time for a CPU's dot-product instruction.

A `DotKernel` names a registered TVM tensor intrinsic with the contract

    C[i] += Σ_k int32(A[k]) · int32(B[i, k])        i < lanes, k < depth      (A: activations, B: weights)

— AVX-512 VNNI ``vpdpbusd`` (16×4, unsigned activations), aarch64 ``sdot`` (4×4), plain NEON
widening multiply-accumulate (4×4) — and which target feature enables it; `dot_kernel(spec)` picks
the first registered kernel whose feature the target has (data, never target names).

`legalize_conv2d` / `legalize_matmul` replace LegalizeOps for int8 × int8 → int32 ``conv2d``
(NHWC/HWIO, any stride/dilation, not grouped) and ``matmul`` against a constant weight: the weight
is packed in numpy to ``[F/lanes, KH, KW, C/depth, lanes, depth]`` (dense: ``[N/lanes, K/depth,
lanes, depth]``; kernels with a `chunk` order each tile ``[depth/chunk, lanes, chunk]``, `even_odd`
ones ``[lanes, 2, depth/2]``), zero-padded to whole tiles — the layout the intrinsic reads with one
vector load; few-channel convs (e.g. a 3-channel stem) instead reduce over each kernel row's KW·C
contiguous NHWC values, padded once to whole `depth` groups (`reduction`);
auto-tensorizing unpacked weights is silently wrong in TVM 0.27. Unsigned-activation kernels see
``x + 128`` and subtract ``128·Σw`` in the epilogue. `schedules.TensorizedDot` schedules the result.

Weight storage: where a target has kernels for int8 and for wider (int16) weights, `choose`
follows the active `WeightStorage` (set with `weight_storage`, from ``compile(optimize_for=...)``):
every layer legalized records its storage and why (`weight_storage` yields the list).

Declines (returns None, the generic int8 path runs): grouped/depthwise conv, non-constant weights,
targets without a dot kernel. An int8 depthwise conv with all-one weights (graphopt's sum pooling)
becomes a weightless window sum instead.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from dataclasses import dataclass

import numpy as np
import tvm
from graphopt.config import OptimizeFor
from graphopt.targets.spec import Feature, TargetSpec
from tvm import relax, te, tirx, topi

DOT_ATTR = "graphopt.dot_intrin"  # block annotation: the intrinsic the tensorizing rule applies


@dataclass(frozen=True)
class DotKernel:
    """A dot-product tensor intrinsic and the target feature that enables it."""

    feature: Feature
    intrin: str  # registered TensorIntrin name
    lanes: int  # output channels per call (int32 results)
    depth: int  # reduction elements per output per call
    data_dtype: str  # "int8", or "uint8": activations are shifted by +128
    accumulators: int  # vector registers the accumulator tile may use
    weight_dtype: str = "int8"  # "int16": weights widened when packed (e.g. for 16-bit MAC pairs)
    min_weight: int = -128  # e.g. −127 for kernels summing two int8 products in an int16 lane
    max_weights: int | None = None  # larger layers take another kernel (e.g. int16 weights' flash)
    chunk: int = 0  # >0: weight tiles [depth/chunk, lanes, chunk] (e.g. indexed sdot), not [lanes, depth]
    even_odd: bool = False  # weight tiles [lanes, 2, depth/2]: even reduction indices, then odd (SXTB16's order)

    def __post_init__(self):
        if self.data_dtype not in ("int8", "uint8"):
            raise ValueError(f"DotKernel.data_dtype must be 'int8' or 'uint8', not {self.data_dtype!r}")
        if self.weight_dtype not in ("int8", "int16"):
            raise ValueError(f"DotKernel.weight_dtype must be 'int8' or 'int16', not {self.weight_dtype!r}")
        if min(self.lanes, self.depth, self.accumulators) < 1:
            raise ValueError("DotKernel lanes, depth and accumulators must be positive")
        if self.chunk < 0 or (self.chunk and self.depth % self.chunk):
            raise ValueError("DotKernel.chunk must be 0 or divide depth")
        if self.even_odd and (self.chunk or self.depth % 2):
            raise ValueError("DotKernel.even_odd needs an even depth and no chunk")

    def tile_layout(self, w: np.ndarray) -> np.ndarray:
        """[..., lanes, depth] weight tiles → the intrinsic's layout ([..., depth/chunk, lanes, chunk] or
        [..., lanes, 2, depth/2])."""
        if self.even_odd:
            return np.swapaxes(w.reshape(*w.shape[:-1], self.depth // 2, 2), -1, -2)
        if not self.chunk:
            return w
        return np.moveaxis(w.reshape(*w.shape[:-1], self.depth // self.chunk, self.chunk), -2, -3)

    def weight(self, wp, outer: tuple, lane, r):
        """The packed weight of output lane `lane`, reduction index `r`, in the tile at `outer`."""
        return wp[(*outer, *_tile(self.lanes, self.depth, self.chunk, self.even_odd)[1](lane, r % self.depth))]


def _tile(lanes: int, depth: int, chunk: int = 0, even_odd: bool = False):
    """(shape, index(lane, k)) of one packed weight tile: ``[lanes, depth]``, ``[depth/chunk, lanes,
    chunk]`` when `chunk` is set, ``[lanes, 2, depth/2]`` with `even_odd` (`DotKernel.tile_layout`)."""
    if even_odd:
        return (lanes, 2, depth // 2), lambda i, k: (i, k % 2, k // 2)
    if chunk:
        return (depth // chunk, lanes, chunk), lambda i, k: (k // chunk, i, k % chunk)
    return (lanes, depth), lambda i, k: (i, k)


def dot_desc(lanes: int, depth: int, weight_dtype: str = "int8", chunk: int = 0, even_odd: bool = False):
    """The TensorIntrin description every dot kernel shares (``C[i] += Σ_k A[k]·B[i, k]``), with B in
    the packed tile layout of `_tile`. An intrinsic registers it beside its own implementation."""
    from tvm.script import tirx as T

    shape, at = _tile(lanes, depth, chunk, even_odd)
    whole = tuple(slice(0, d) for d in shape)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (depth,), "int8", offset_factor=1)
        B = T.match_buffer(b, shape, weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[whole])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, depth):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[at(vi, vk)], "int32")

    return desc


_KERNELS: list[DotKernel] = []


def register_dot_kernel(kernel: DotKernel, before: str | None = None) -> DotKernel:
    """Add `kernel` (before the kernel whose intrinsic is `before`, else last); earlier kernels are
    preferred where several fit a layer equally well."""
    at = next((i for i, k in enumerate(_KERNELS) if k.intrin == before), len(_KERNELS))
    _KERNELS.insert(at, kernel)
    return kernel


def dot_kernels(spec: TargetSpec) -> tuple[DotKernel, ...]:
    """The dot kernels int8 layers may use on `spec`, preferred first (empty: the generic int8 path)."""
    _register_intrinsics()
    return tuple(k for k in _KERNELS if spec.has(k.feature))


def dot_kernel(spec: TargetSpec) -> DotKernel | None:
    """The preferred dot kernel on `spec`, if any."""
    return next(iter(dot_kernels(spec)), None)


@dataclass(frozen=True)
class WeightStorage:
    """The weight-storage policy of one build: `OptimizeFor`, and the layers (by `layer_key`) that keep
    int8 weights because the board's flash cannot hold them wider."""

    optimize_for: OptimizeFor = OptimizeFor.BALANCED
    narrow: frozenset = frozenset()


_STORAGE: contextvars.ContextVar = contextvars.ContextVar("graphopt_weight_storage", default=None)


@contextlib.contextmanager
def weight_storage(policy: WeightStorage):
    """Within, `choose` follows `policy`; yields the list the legalizations append their decisions to
    (``{"layer", "key", "packed_key", "weights", "macs", "storage", "reason", "wide_extra_bytes"}``)."""
    decisions: list[dict] = []
    token = _STORAGE.set((policy, decisions))
    try:
        yield decisions
    finally:
        _STORAGE.reset(token)


def recorded_decisions() -> list[dict]:
    """The decisions recorded so far under the innermost `weight_storage` (empty outside one)."""
    active = _STORAGE.get()
    return [] if active is None else list(active[1])


def summarize_storage(decisions: list[dict]) -> dict:
    """The report's view of a build's weight-storage decisions."""
    return {"layers": [{k: d[k] for k in ("layer", "weights", "storage", "reason")} for d in decisions],
            "int16_layers": sum(d["storage"] == "int16" for d in decisions),
            "int8_layers": sum(d["storage"] == "int8" for d in decisions)}


def active_storage() -> WeightStorage:
    """The policy `weight_storage` set (the default one outside)."""
    active = _STORAGE.get()
    return WeightStorage() if active is None else active[0]


def layer_key(weights: np.ndarray) -> str:
    """A layer's identity across builds: a digest of its (constant) weights."""
    digest = hashlib.sha1(f"{weights.dtype}{weights.shape}".encode() + np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()[:16]


def _wide(k: DotKernel) -> bool:
    return k.weight_dtype != "int8"


def _allowed(k: DotKernel, weights: np.ndarray, policy: WeightStorage) -> bool:
    if not _wide(k):
        return True
    if policy.optimize_for is OptimizeFor.SIZE or layer_key(weights) in policy.narrow:
        return False
    return policy.optimize_for is OptimizeFor.SPEED or k.max_weights is None or weights.size <= k.max_weights


def _storage_reason(kernels, weights: np.ndarray, chosen: DotKernel, policy: WeightStorage) -> str:
    """Why `chosen` stores this layer's weights as it does."""
    wide = [k for k in kernels if _wide(k) and int(weights.min(initial=0)) >= k.min_weight]
    if _wide(chosen):
        return "faster: the kernel multiplies ready int16 pairs"
    if not wide:
        return "the target's kernels for these weights take int8"
    if policy.optimize_for is OptimizeFor.SIZE:
        return "optimize_for=size"
    if layer_key(weights) in policy.narrow:
        return "the board's flash cannot hold it as int16"
    cap = min((k.max_weights for k in wide if k.max_weights is not None), default=None)
    if policy.optimize_for is OptimizeFor.BALANCED and cap is not None and weights.size > cap:
        return f"{weights.size:,} weights > {cap:,} (optimize_for=balanced)"
    return "less padding"


def _record(kernels, w: np.ndarray, packed: np.ndarray, k: DotKernel, layer: str, macs: int) -> None:
    """Append this layer's storage decision to the active `weight_storage` list, if any."""
    active = _STORAGE.get()
    if active is None:
        return
    policy, decisions = active
    decisions.append({"layer": layer, "key": layer_key(w), "packed_key": layer_key(packed), "weights": int(w.size),
                      "macs": int(macs), "storage": k.weight_dtype,
                      "reason": _storage_reason(kernels, w, k, policy),
                      "wide_extra_bytes": int(packed.nbytes // 2) if _wide(k) else 0})


def choose(kernels, weights: np.ndarray, channels: int, window: int = 1) -> DotKernel | None:
    """The kernel for one layer: among those whose weight range fits and whose weight storage the
    active `WeightStorage` allows, the first whose reduction needs no padding, else the one padding
    least (e.g. a 3-channel stem conv); None when even that would double the reduction. `window` > 1
    (a conv's kernel width, dilation 1) lets a kernel reduce over the window's `window`·`channels`
    contiguous values instead of over channels (`reduction`)."""
    policy = active_storage()
    fit = [k for k in kernels if int(weights.min(initial=0)) >= k.min_weight and _allowed(k, weights, policy)]
    best = min(fit, key=lambda k: reduction(k, channels, window)[0], default=None)
    if best is None or reduction(best, channels, window)[0] >= 2 * window * channels:
        return None  # e.g. a 1-channel dense input: the generic kernel does a quarter of the MACs
    return best


def reduction(k: DotKernel, channels: int, window: int = 1) -> tuple[int, bool]:
    """(reduced values per kernel row, flattened): `window` × channels padded to whole `depth` groups,
    or — when fewer — the row's window·channels values (contiguous in NHWC) padded once (flattened;
    e.g. a 1-channel 3×3 conv reduces 4 values per row instead of 12)."""
    by_channel, flat = window * _ceil(channels, k.depth), _ceil(window * channels, k.depth)
    return (flat, True) if flat < by_channel else (by_channel, False)


def by_intrin(kernels, name: str) -> DotKernel | None:
    return next((k for k in kernels if k.intrin == name), None)


register_dot_kernel(DotKernel(Feature.AVX512_VNNI, "dot_16x4_vnni", 16, 4, "uint8", 16))
register_dot_kernel(DotKernel(Feature.DOTPROD, "dot_4x4_i8i8s32_sdot", 4, 4, "int8", 24))
register_dot_kernel(DotKernel(Feature.A64, "dot_4x4_i8i8s32_neon", 4, 4, "int8", 16))  # aarch64 NEON intrinsics

_REGISTERED = False


def _register_intrinsics() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from graphopt.targets.tuning import prepare_tvm

        prepare_tvm()  # registers TVM's CPU intrinsics, with the VNNI one fixed for LLVM 22
        from graphopt.targets import (  # noqa: F401  importing registers the kernels
            intrin_cortex_m,  # the Cortex-M DSP kernel
            intrin_dotprod,  # the aarch64 indexed-sdot 4×16 kernel
            intrin_neon,  # the NEON 4×64/4×32/4×16 kernels
        )
        _REGISTERED = True


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def _static(shape) -> list[int] | None:
    if shape is None or any(not isinstance(d, tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def _pack_conv_weight(w: np.ndarray, k: DotKernel) -> np.ndarray:
    """HWIO [KH, KW, C, F] → [F/lanes, KH, KW, C/depth, lanes, depth] (tiles in `DotKernel.tile_layout`),
    zero-padded to whole tiles."""
    kh, kw, c, f = w.shape
    cp, fp = _ceil(c, k.depth), _ceil(f, k.lanes)
    w = np.pad(w, [(0, 0), (0, 0), (0, cp - c), (0, fp - f)])
    w = w.reshape(kh, kw, cp // k.depth, k.depth, fp // k.lanes, k.lanes)
    return np.ascontiguousarray(k.tile_layout(w.transpose(4, 0, 1, 2, 5, 3))).astype(k.weight_dtype)


def _pack_dense_weight(w: np.ndarray, k: DotKernel) -> np.ndarray:
    """[K, N] → [N/lanes, K/depth, lanes, depth] (tiles in `DotKernel.tile_layout`), zero-padded to whole tiles."""
    kk, n = w.shape
    kp, np_ = _ceil(kk, k.depth), _ceil(n, k.lanes)
    w = np.pad(w, [(0, kp - kk), (0, np_ - n)]).reshape(kp // k.depth, k.depth, np_ // k.lanes, k.lanes)
    return np.ascontiguousarray(k.tile_layout(w.transpose(2, 0, 3, 1))).astype(k.weight_dtype)


def _prepare_data(data, channels: int, k: DotKernel):
    """Channels zero-padded to whole `depth` groups; +128 as uint8 for unsigned-activation kernels."""
    c = int(data.shape[-1])
    if channels != c:
        data = topi.nn.pad(data, [0] * len(data.shape), [0] * (len(data.shape) - 1) + [channels - c],
                           name="channel_pad")
    if k.data_dtype == "uint8":
        src = data
        data = te.compute(src.shape, lambda *i: _as_data(src[i], k), name="data_u8")
    return data


def _as_data(value, k: DotKernel):
    """An int8 activation as the kernel reads it: itself, or + 128 as uint8."""
    return (value.astype("int32") + 128).astype("uint8") if k.data_dtype == "uint8" else value


def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call, kernels: tuple[DotKernel, ...]):
    """int8 NHWC/HWIO conv2d with a constant weight as a tensorizable packed-weight kernel, or None."""
    attrs = call.attrs
    data, weight = call.args
    if (window_sum := _legalize_window_sum(bb, call)) is not None:
        return window_sum
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC") \
            or int(attrs.groups) != 1 or not isinstance(weight, tvm.ir.expr.Constant) \
            or str(data.ty.dtype) != "int8" or str(weight.ty.dtype) != "int8" \
            or str(attrs.out_dtype) != "int32" or _static(data.ty.shape) is None:
        return None
    w = weight.value.numpy()
    kh, kw, c, f = w.shape
    strides, dilation = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
    padding = [int(v) for v in attrs.padding]
    # rows of 1-channel convs stay on the generic kernel: cortex-m4's plain_cnn stem measured 530k
    # instructions reducing 4-value rows (one zero tap) against 385k generic
    window = kw if dilation[1] == 1 and c > 1 else 1
    k = choose(kernels, w, c, window)
    if k is None:
        return None
    flat = reduction(k, c, window)[1]
    packed = _pack_conv_weight(w.reshape(kh, 1, kw * c, f) if flat else w, k)
    out_pixels = int(np.prod([int(d) for d in call.ty.shape][:-1]))
    _record(kernels, w, packed, k, f"conv2d {kh}x{kw} {c}->{f}", out_pixels * kh * kw * c * f)
    correction = (128 * w.astype(np.int64).sum(axis=(0, 1, 2))).astype(np.int32) \
        if k.data_dtype == "uint8" else None

    def compute(x, wp, *corr):
        pt, pl, pb, pr = padding
        if any(padding):
            x = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr, 0], name="pad_temp")
        n, h, wd, _ = (int(d) for d in x.shape)
        (sh, sw), (dh, dw) = strides, dilation
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
        ry = te.reduce_axis((0, kh), "ry")
        r = te.reduce_axis((0, packed.shape[3] * k.depth), "r")
        if flat:  # rows as [n, h, w·c] (+ columns the padded reduction reads past the last window: weight 0)
            extra = -(-max(0, (ow - 1) * sw * c + packed.shape[3] * k.depth - wd * c) // c)
            if extra:
                x = topi.nn.pad(x, [0, 0, 0, 0], [0, 0, extra, 0], name="window_pad")
            src = x
            xd = te.compute((n, h, (wd + extra) * c), lambda b, y, j: _as_data(src[b, y, j // c, j % c], k),
                            name="rows")
            column, axes = 0, [ry, r]

            def tap(b, y, xx):
                return xd[b, y * sh + ry * dh, xx * sw * c + r]
        else:
            xd = _prepare_data(x, packed.shape[3] * k.depth, k)
            rx = te.reduce_axis((0, kw), "rx")
            column, axes = rx, [ry, rx, r]

            def tap(b, y, xx):
                return xd[b, y * sh + ry * dh, xx * sw + rx * dw, r]
        acc = te.compute(
            (n, oh, ow, packed.shape[0] * k.lanes),
            lambda b, y, xx, ff: te.sum(
                tap(b, y, xx).astype("int32")
                * k.weight(wp, (ff // k.lanes, ry, column, r // k.depth), ff % k.lanes, r).astype("int32"),
                axis=axes),
            name="conv2d_int8_dot", attrs={DOT_ATTR: k.intrin})
        return _finish(acc, f, corr)

    return _emit(bb, compute, data, packed, correction, "conv2d_int8")


def _legalize_window_sum(bb: relax.BlockBuilder, call: relax.Call):
    """An int8 NHWC depthwise conv whose constant weights are all ones (graphopt's sum pooling, e.g. a
    quantized global average pool) as a window sum: no weights in flash, no multiplies; or None."""
    attrs = call.attrs
    data, weight = call.args
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC") \
            or not isinstance(weight, tvm.ir.expr.Constant) or str(data.ty.dtype) != "int8" \
            or str(attrs.out_dtype) != "int32" or _static(data.ty.shape) is None:
        return None
    w = weight.value.numpy()
    kh, kw, one, c = w.shape
    if one != 1 or int(attrs.groups) != c or int(data.ty.shape[-1]) != c or not (w == 1).all():
        return None
    (sh, sw), (dh, dw) = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
    pt, pl, pb, pr = (int(v) for v in attrs.padding)

    def compute(x):
        if pt or pl or pb or pr:
            x = topi.nn.pad(x, [0, pt, pl, 0], [0, pb, pr, 0], name="pad_temp")
        n, h, wd, _ = (int(d) for d in x.shape)
        ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
        return te.compute((n, (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1, c),
                          lambda b, y, xx, ch: te.sum(x[b, y * sh + ry * dh, xx * sw + rx * dw, ch].astype("int32"),
                                                      axis=[ry, rx]), name="window_sum")

    return bb.call_te(compute, data, primfunc_name_hint="window_sum_int8")


def legalize_matmul(bb: relax.BlockBuilder, call: relax.Call, kernels: tuple[DotKernel, ...]):
    """int8 ``x @ W`` (W constant [K, N]) → int32 as a tensorizable packed-weight kernel, or None."""
    a, weight = call.args
    if not isinstance(weight, tvm.ir.expr.Constant) or len(weight.ty.shape) != 2 or a.ty.ndim < 2 \
            or str(a.ty.dtype) != "int8" or str(weight.ty.dtype) != "int8" \
            or str(call.attrs.out_dtype) != "int32" or _static(a.ty.shape) is None:
        return None
    w = weight.value.numpy()
    n = w.shape[1]
    k = choose(kernels, w, w.shape[0])
    if k is None:
        return None
    packed = _pack_dense_weight(w, k)
    rows = int(np.prod([int(d) for d in a.ty.shape][:-1]))
    _record(kernels, w, packed, k, f"dense {w.shape[0]}->{n}", rows * w.size)
    correction = (128 * w.astype(np.int64).sum(axis=0)).astype(np.int32) if k.data_dtype == "uint8" else None

    def compute(x, wp, *corr):
        xd = _prepare_data(x, packed.shape[1] * k.depth, k)
        r = te.reduce_axis((0, packed.shape[1] * k.depth), "k")
        acc = te.compute(
            (*xd.shape[:-1], packed.shape[0] * k.lanes),
            lambda *i: te.sum(xd[(*i[:-1], r)].astype("int32")
                              * k.weight(wp, (i[-1] // k.lanes, r // k.depth), i[-1] % k.lanes, r).astype("int32"),
                              axis=r),
            name="dense_int8_dot", attrs={DOT_ATTR: k.intrin})
        return _finish(acc, n, corr)

    return _emit(bb, compute, a, packed, correction, "dense_int8")


def _finish(acc, channels: int, corr):
    """Subtract the unsigned-activation correction and drop the padding channels, if any."""
    if not corr and int(acc.shape[-1]) == channels:
        return acc
    shape = [*acc.shape[:-1], channels]
    if not corr:
        return te.compute(shape, lambda *i: acc[i], name="dot_epilogue")
    (c,) = corr
    return te.compute(shape, lambda *i: acc[i] - c[i[-1]], name="dot_epilogue")


def _emit(bb, compute, data, packed: np.ndarray, correction, name: str):
    args = [data, relax.const(packed, str(packed.dtype))]
    if correction is not None:
        args.append(relax.const(correction, "int32"))
    return bb.call_te(compute, *args, primfunc_name_hint=name)

