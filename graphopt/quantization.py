"""Quantization: PTQ, QAT and binary networks, producing QDQ graphs that `FoldQDQ` turns into integers.

    qm = graphopt.quantize(model, (x,), calibration=loader, scheme=QuantScheme(weights=8, activations=8))
    qm = graphopt.prepare_qat(model, (x,), scheme=...)   # trainable fake-quant module; train it, then
    qm = graphopt.convert(qm)                            # QDQ form (quantize/dequantize nodes around ops)
    bm = graphopt.binarize(model, (x,))                  # XNOR-Net style QAT module; train, then convert
    ig = graphopt.to_integer(qm, (x,))                   # the folded integer fx graph (graphopt.qops)

The scheme says *what* is quantized (bits, granularity, observers, per-layer overrides; the first
and last conv/linear, and the graph inputs, stay 8-bit by default); the graph work is generic. The model is captured
(`graphopt.capture`) in eval mode, batch norm is folded, and a `FakeQuantize` module is inserted
on every conv/linear weight (per output channel, symmetric) and on every float activation:
graph inputs and op outputs, one shared module across views, max pooling, a split's items and a
standalone ReLU (their int8 forms are data movement and a clamp), and after — not between — a
conv/linear/add/mul/BatchNorm/pooling/concat and the ReLU/ReLU6/clamp that follows it (folded into
the integer output range, `graphopt.ops.FUSES_CLAMP`). Layers with binary
activations get a sign quantizer on their input. Fake quantization rounds with a straight-through
gradient that is zero outside the clipping range; learnable scales get LSQ gradients.

Refuses (`QuantizationError`, nothing written): unsupported bit widths or options, option values
of the wrong type (``weights=8.0`` or ``True``), overrides for paths that match no layer, a
calibration set that is not an iterable of batches, calibration batches whose shapes/dtypes differ
from the example inputs (except the batch size) or an empty calibration set, NaN/inf in weights or
activations, converting a module `prepare_qat`/`binarize` made before any training step changed
it, and converting anything that is not a prepared module.
"""
from __future__ import annotations

import copy
import enum
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from graphopt import qops  # noqa: F401  registers torch.ops.graphopt and quantized_decomposed
from graphopt.config import as_enum
from graphopt.errors import QuantizationError
from graphopt.ops import CLAMPS, PADS, PASS_THROUGH, SHARES_PARAMS, SPLITS
from graphopt.passes.base import PassContext, Property
from graphopt.passes.capture import capture, check_example_inputs
from graphopt.passes.fold_batchnorm import bn_parts
from graphopt.passes.fold_qdq import affine_unit, fuses_clamp
from graphopt.passes.graph import get_attr_value, is_op
from graphopt.source import node_module

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

WEIGHT_BITS = (8, 4, 2, 1)
ACTIVATION_BITS = (8, 4, 1, None)  # 1: binary (sign) inputs to the layer; None: weight-only
_LAYERS = (aten.conv2d.default, aten.linear.default)
_SAMPLE = 1 << 16  # values kept per activation for percentile / MSE observers


class Observer(str, enum.Enum):
    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"  # EMA of per-batch min/max
    PERCENTILE = "percentile"  # range = [100−p, p] percentiles of a value sample
    MSE = "mse"  # clipping range minimizing the quantization error


@dataclass(frozen=True)
class LayerQuant:
    """Per-layer override: weight bits (None keeps the layer float) and activation bits."""

    weights: int | None = 8
    activations: int | None = 8

    def __post_init__(self):
        _check_bits(self, "weights", "activations")
        if self.weights not in (*WEIGHT_BITS, None):
            raise QuantizationError(f"weight bit width {self.weights!r} is not supported; use one of "
                                    f"{WEIGHT_BITS} (or None to keep the layer float)")
        if self.activations not in ACTIVATION_BITS:
            raise QuantizationError(f"activation bit width {self.activations!r} is not supported; use one of "
                                    f"{ACTIVATION_BITS}")


def _check_bits(obj, *names: str) -> None:
    """Bit widths are ints or None: 8.0, True or "8" are refused, not coerced (True == 1 would mean binary)."""
    for name in names:
        v = getattr(obj, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise QuantizationError(f"{name}={v!r} ({type(v).__name__}) must be an int bit width or None, "
                                    f"e.g. {name}=8")


class _FrozenDict(dict):
    """A dict that refuses changes (keeps `QuantScheme` frozen; unlike mappingproxy it deep-copies)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("QuantScheme.overrides is read-only; build a new QuantScheme")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse

    def __reduce__(self):  # copy/pickle rebuild from a plain dict (the default refills item by item)
        return type(self), (dict(self),)


@dataclass(frozen=True)
class QuantScheme:
    weights: int = 8
    activations: int | None = 8
    per_channel: bool = True
    symmetric_activations: bool = False
    observer: Observer = Observer.MINMAX  # activations
    weight_observer: Observer = Observer.MINMAX
    percentile: float = 99.99
    averaging_constant: float = 0.01
    keep_first_last_8bit: bool = True
    learnable_scales: bool = False  # QAT: LSQ-style trainable scales instead of observed ones
    overrides: Mapping[str, LayerQuant] = field(default_factory=dict)  # module path → LayerQuant

    def __post_init__(self):
        LayerQuant(self.weights, self.activations)
        for name in ("per_channel", "symmetric_activations", "keep_first_last_8bit", "learnable_scales"):
            if not isinstance(getattr(self, name), bool):
                raise QuantizationError(f"{name}={getattr(self, name)!r} must be True or False")
        for name in ("percentile", "averaging_constant"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise QuantizationError(f"{name}={v!r} ({type(v).__name__}) must be a number")
        if not isinstance(self.overrides, Mapping) or not all(isinstance(k, str) for k in self.overrides):
            raise QuantizationError(f"overrides must map module paths (str) to LayerQuant, e.g. "
                                    f"{{'features.0': LayerQuant(weights=8)}}; got {self.overrides!r}")
        for name in ("observer", "weight_observer"):
            object.__setattr__(self, name, as_enum(Observer, getattr(self, name), name, QuantizationError))
        if not 50.0 < self.percentile <= 100.0:
            raise QuantizationError(f"percentile={self.percentile} must be in (50, 100]")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise QuantizationError(f"averaging_constant={self.averaging_constant} must be in (0, 1]")
        bad = {k: v for k, v in dict(self.overrides).items() if not isinstance(v, LayerQuant)}
        if bad:
            raise QuantizationError(f"overrides values must be LayerQuant(weights=..., activations=...): {bad}")
        object.__setattr__(self, "overrides", _FrozenDict(self.overrides))

    def __hash__(self):
        return hash(tuple((k, v) for k, v in vars(self).items() if k != "overrides")
                    + tuple(sorted(self.overrides.items())))

    def for_layer(self, path: str, first_or_last: bool) -> LayerQuant:
        """The most specific override whose path is ``path`` or a parent of it, else the default."""
        match = [k for k in self.overrides if path == k or path.startswith(k + ".") or k == ""]
        if match:
            return self.overrides[max(match, key=len)]
        if first_or_last and self.keep_first_last_8bit:
            return LayerQuant(8 if self.weights is not None else None, 8 if self.activations is not None else None)
        return LayerQuant(self.weights, self.activations)


def _qrange(bits: int) -> tuple[int, int]:
    return (-1, 1) if bits == 1 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def _round_ste(x):
    return x + (x.round() - x).detach()


def _sign_ste(x):  # forward sign (0 → +1), backward identity inside [−1, 1] (STE with clipping)
    c = x.clamp(-1.0, 1.0)
    return c + (torch.where(x >= 0, 1.0, -1.0) - c).detach()


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise QuantizationError(f"{what} contains NaN or inf; quantization needs finite values "
                                "(check the model's weights and the calibration data)")


class FakeQuantize(nn.Module):
    """Observer + fake quantizer of one tensor (activation: per tensor; weight: per output channel)."""

    def __init__(self, bits: int, *, weight: bool, symmetric: bool, per_channel: bool, observer: Observer,
                 percentile: float, averaging_constant: float, sign: bool = False):
        super().__init__()
        self.bits, self.weight, self.symmetric, self.per_channel, self.sign = bits, weight, symmetric, per_channel, sign
        self.observer, self.percentile, self.averaging_constant = observer, percentile, averaging_constant
        self.qmin, self.qmax = _qrange(bits)
        self.observing, self.fake_quant = True, False
        self.lo: torch.Tensor
        self.hi: torch.Tensor
        self.sample: torch.Tensor
        self.abs_mean: torch.Tensor
        self.register_buffer("lo", torch.tensor([]))
        self.register_buffer("hi", torch.tensor([]))
        self.register_buffer("sample", torch.tensor([]))
        self.register_buffer("abs_mean", torch.tensor([]))
        self.scale_param: nn.Parameter | None = None
        self.what = ""  # set by prepare: the node it observes, for error messages

    # ---- observation
    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        if self.weight:  # weights: recomputed from the current value (binary weights need no range)
            if self.bits != 1:
                flat = x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)
                self.lo, self.hi = self._weight_range(flat.detach().float())
            return
        x = x.detach().float()
        lo, hi = (v.reshape(1) for v in torch.aminmax(x))
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):  # NaN and ±inf reach the extremes
            _check_finite(x, self.what or "a quantized tensor")
        mean_abs = x.abs().mean().reshape(1)
        c = self.averaging_constant
        if self.lo.numel() == 0:
            self.lo, self.hi, self.abs_mean = lo, hi, mean_abs
        elif self.observer == Observer.MOVING_AVERAGE:
            self.lo, self.hi = self.lo + c * (lo - self.lo), self.hi + c * (hi - self.hi)
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self.abs_mean = self.abs_mean + c * (mean_abs - self.abs_mean)
        if self.observer in (Observer.PERCENTILE, Observer.MSE):
            flat = x.reshape(-1)
            pick = flat[torch.randint(0, flat.numel(), (min(flat.numel(), _SAMPLE // 4),))]
            merged = torch.cat([self.sample, pick])
            self.sample = merged[torch.randperm(merged.numel())[:_SAMPLE]]

    def _weight_range(self, flat: torch.Tensor):
        amax = flat.abs().amax(dim=1)
        if self.observer == Observer.PERCENTILE:
            amax = torch.quantile(flat.abs(), self.percentile / 100.0, dim=1)
        elif self.observer == Observer.MSE:
            amax = self._mse_clip(flat, amax)
        return -amax, amax

    def _mse_clip(self, flat: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        """Per row, the clipping ratio in [0.3, 1] that minimizes ‖fq(x) − x‖² (symmetric)."""
        ratios = torch.linspace(0.3, 1.0, 36)
        best, best_err = amax.clone(), torch.full_like(amax, float("inf"))
        for r in ratios:
            a = (amax * r).clamp(min=1e-12)
            s = (a / self.qmax).unsqueeze(1)
            err = ((torch.clamp(torch.round(flat / s), self.qmin, self.qmax) * s - flat) ** 2).sum(dim=1)
            better = err < best_err
            best, best_err = torch.where(better, a, best), torch.where(better, err, best_err)
        return best

    def _activation_range(self) -> tuple[float, float]:
        lo, hi = float(self.lo[0]), float(self.hi[0])
        if self.observer == Observer.PERCENTILE and self.sample.numel():
            q = torch.quantile(self.sample, torch.tensor([1 - self.percentile / 100, self.percentile / 100]))
            lo, hi = max(lo, float(q[0])), min(hi, float(q[1]))
        elif self.observer == Observer.MSE and self.sample.numel():
            lo, hi = self._mse_range(lo, hi)
        return lo, hi

    def _mse_range(self, lo: float, hi: float) -> tuple[float, float]:
        best, best_err = (lo, hi), float("inf")
        for r in torch.linspace(0.3, 1.0, 36).tolist():
            s, z = self._params_for(lo * r, hi * r)
            q = torch.clamp(torch.round(self.sample / s) + z, self.qmin, self.qmax)
            err = float((((q - z) * s - self.sample) ** 2).sum())
            if err < best_err:
                best, best_err = (lo * r, hi * r), err
        return best

    def _params_for(self, lo: float, hi: float) -> tuple[float, int]:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.symmetric:
            amax = max(-lo, hi)
            return float(torch.tensor(max(amax / self.qmax, 1e-8), dtype=torch.float32)), 0
        scale = float(torch.tensor(max((hi - lo) / (self.qmax - self.qmin), 1e-8), dtype=torch.float32))
        return scale, int(min(self.qmax, max(self.qmin, self.qmin - round(lo / scale))))

    # ---- parameters
    @property
    def calibrated(self) -> bool:
        return (self.weight and self.bits == 1) or self.lo.numel() > 0

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) tensors: per channel (weights) or one element."""
        if self.bits == 1:  # binary: α = mean|x| per channel (weights) or the running mean|x|
            if self.weight:
                if x is None:
                    raise QuantizationError(f"{self.what}: binary weight parameters are computed from the weight")
                flat = x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)
                alpha = flat.abs().mean(dim=1).clamp(min=1e-8)
            else:
                alpha = self.abs_mean.clamp(min=1e-8)
            return alpha, torch.zeros_like(alpha, dtype=torch.int64)
        if self.scale_param is not None:
            return self.scale_param.abs().clamp(min=1e-8), self.zero_point_fixed
        if self.weight:
            scale = (self.hi / self.qmax).clamp(min=1e-8).float()
            return scale, torch.zeros_like(scale, dtype=torch.int64)
        s, z = self._params_for(*self._activation_range())
        return torch.tensor([s]), torch.tensor([z])

    def make_learnable(self) -> None:
        """Freeze the observed zero point and turn the scale into a trainable parameter (LSQ)."""
        if self.bits == 1:
            return
        scale, zp = self.qparams()
        self.register_buffer("zero_point_fixed", zp.clone())
        self.scale_param = nn.Parameter(scale.clone().float())
        self.observing = False

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight or not self.observing:  # an observed activation is checked on its extremes
            _check_finite(x, self.what or "a quantized tensor")
        if self.observing:
            self._observe(x)
        if not self.fake_quant:
            return x
        scale, zp = self.qparams(x)
        if self.bits == 1:
            shape = (-1,) + (1,) * (x.dim() - 1) if self.weight else (1,)
            return _sign_ste(x) * scale.reshape(shape)
        shape = (-1,) + (1,) * (x.dim() - 1) if self.weight and scale.numel() > 1 else (1,) * max(x.dim(), 1)
        s, z = scale.reshape(shape), zp.to(x.dtype).reshape(shape)
        return (torch.clamp(_round_ste(x / s) + z, self.qmin, self.qmax) - z) * s

    @torch.no_grad()
    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer values (int8 storage) of a weight under the current parameters."""
        if self.bits == 1:
            return torch.where(x >= 0, 1, -1).to(torch.int8)
        scale, _ = self.qparams(x)
        s = scale.reshape((-1,) + (1,) * (x.dim() - 1))
        return torch.clamp(torch.round(x / s), self.qmin, self.qmax).to(torch.int8)

    def extra_repr(self) -> str:
        kind = "weight" if self.weight else ("sign" if self.sign else "activation")
        return f"{kind}, bits={self.bits}, observer={self.observer.value}"


@dataclass
class _Prepared:
    """What `convert` needs to know about a prepared module."""

    scheme: QuantScheme
    qat: bool
    initial: dict = field(default_factory=dict)  # parameter name → value at prepare (QAT)
    layer_bits: dict = field(default_factory=dict)  # node name → LayerQuant


def _shares_params_with(n: fx.Node) -> fx.Node | None:
    """The value whose quantizer ``n`` reuses: the input of views, max pooling and padding (they
    commute with (s, z): int8 data movement; observed ranges hold 0.0, a zero pad's value), of a
    split's items (slices) and of a standalone ReLU (an int8 clamp, at most 1 bit of range given
    up, as PyTorch's quantizers do). Bounded clamps (ReLU6, hardtanh) get their own range: a lookup
    table, exact."""
    src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if is_op(n, *PASS_THROUGH, *PADS, *SHARES_PARAMS):
        return src
    if n.target is operator.getitem and is_op(src, *SPLITS):
        return src.args[0]
    return None


def _float_tensor(node: fx.Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _layers(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_op(n, *_LAYERS) and isinstance(n.args[1], fx.Node)
            and n.args[1].op == "get_attr"]


def _capture_any_batch(model: nn.Module, args: tuple) -> fx.GraphModule:
    """Capture with a dynamic batch dimension (calibration/training batches vary), else as `capture`
    does; either way in canonical (functional) form. The graph is the eval-mode one (BN statistics,
    no dropout); train()/eval() only flip flags.

    torch.export specializes a batch of 1 (a size-1 dimension is never symbolic), which bakes the
    batch into code like ``x.view(b, g, c // g, h, w)`` (channel shuffle); so a batch of 1 is
    traced on two copies of the example, and that graph is kept only if it reproduces the model's
    output on the real example (a batch-1-only behaviour such as ``squeeze()`` would not)."""
    from graphopt.passes.capture import canonicalize, export, strip_guards
    from graphopt.passes.manager import flat_outputs

    def export_any_batch(example: tuple) -> fx.GraphModule:
        ep = export(model, example, dynamic_shapes=[{0: torch.export.Dim.AUTO} for _ in example])
        return canonicalize(strip_guards(ep.module()), example)[0]

    def same_as_model(gm: fx.GraphModule) -> bool:
        with torch.no_grad():
            want, got = flat_outputs(model(*args)), flat_outputs(gm(*args))
        return len(want) == len(got) and all(w.shape == g.shape and torch.equal(w, g)
                                             for w, g in zip(want, got, strict=True))

    gm = None
    if all(a.dim() and a.shape[0] == 1 for a in args):
        try:
            gm = export_any_batch(tuple(torch.cat([a, a]) for a in args))
            gm = gm if same_as_model(gm) else None
        except Exception:  # noqa: BLE001  batch-1-only code: the plain capture below
            gm = None
    if gm is None:
        try:
            gm = export_any_batch(args)
        except Exception:  # noqa: BLE001  e.g. batch-dependent Python code: capture() reports its own errors
            gm = capture(model, args).graph_module
    gm._forward_pre_hooks.clear()  # export's input-shape check; graphopt checks batches itself
    for name in ("train", "eval"):  # torch.export's unlifted modules refuse both
        vars(gm).pop(name, None)
    return gm


def _own_tensors(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm`` copies of the tensors its capture shares with ``model`` (a conv/linear without batch
    norm keeps the caller's parameter): training the QAT module must not write into the caller's model."""
    theirs = {t.data_ptr() for t in (*model.parameters(), *model.buffers()) if t.numel()}
    for mod in gm.modules():
        for table in (mod._parameters, mod._buffers):
            for k, t in table.items():
                if t is not None and t.numel() and t.data_ptr() in theirs:
                    copy_ = t.detach().clone()
                    table[k] = nn.Parameter(copy_, t.requires_grad) if isinstance(t, nn.Parameter) else copy_


def _static_batch(gm: fx.GraphModule) -> int | None:
    """The batch size a captured graph is specialized to, or None if its batch is symbolic."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    v = first.meta.get("val") if first is not None else None
    if not isinstance(v, torch.Tensor) or not v.dim() or isinstance(v.shape[0], torch.SymInt):
        return None
    return int(v.shape[0])


def prepare_observed(model: nn.Module, example_inputs, scheme: QuantScheme, qat: bool) -> fx.GraphModule:
    if not isinstance(scheme, QuantScheme):
        raise QuantizationError(f"scheme must be a graphopt.QuantScheme, got {type(scheme).__name__}")
    if not isinstance(model, nn.Module):
        raise QuantizationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point():
            _check_finite(p, f"model tensor {name!r}")
    from graphopt.passes.dead_code import DeadCodeElimination
    from graphopt.passes.fold_batchnorm import FoldBatchNorm
    from graphopt.passes.manager import PassManager
    from graphopt.passes.remove_identity import RemoveIdentity

    args = check_example_inputs(example_inputs)
    was_training = model.training
    model.eval()
    try:
        gm = _capture_any_batch(model, args)
    finally:
        model.train(was_training)
    if any(is_op(n, *qops.QDQ_OPS) for n in gm.graph.nodes):
        raise QuantizationError("the model is already quantized (it contains quantize/dequantize nodes); "
                                "compile it directly")
    gm, _ = PassManager([RemoveIdentity(), FoldBatchNorm(), DeadCodeElimination()]).run(
        gm, PassContext(args, None, {Property.ATEN, Property.INFERENCE}))
    if qat:
        _own_tensors(gm, model)

    layers = _layers(gm)
    paths = {n.name: node_module(n) for n in layers}
    unknown = [k for k in scheme.overrides if k and not any(p == k or p.startswith(k + ".") for p in paths.values())]
    if unknown:
        raise QuantizationError(f"overrides {unknown} match no conv/linear layer; layers are at "
                                f"{sorted(set(paths.values()))}")
    info = _Prepared(scheme, qat)
    for i, n in enumerate(layers):
        info.layer_bits[n.name] = scheme.for_layer(paths[n.name], i in (0, len(layers) - 1))

    counter = iter(range(1 << 30))

    def add(fq: FakeQuantize, what: str) -> str:
        name = f"fq_{next(counter)}"
        fq.what = what
        gm.add_submodule(name, fq)
        return name

    def act_fq(bits: int, sign: bool = False) -> FakeQuantize:
        return FakeQuantize(bits, weight=False, symmetric=scheme.symmetric_activations or sign, per_channel=False,
                            observer=scheme.observer, percentile=scheme.percentile,
                            averaging_constant=scheme.averaging_constant, sign=sign)

    graph = gm.graph
    for n in layers:  # weights, per output channel
        lq = info.layer_bits[n.name]
        if lq.weights is None:
            continue
        fq = FakeQuantize(lq.weights, weight=True, symmetric=True, per_channel=scheme.per_channel,
                          observer=scheme.weight_observer, percentile=scheme.percentile,
                          averaging_constant=scheme.averaging_constant)
        w = n.args[1]
        with graph.inserting_before(n):
            wq = graph.call_module(add(fq, f"weight of {paths[n.name] or n.name}"), (w,))
        n.replace_input_with(w, wq)
        if lq.activations == 1:  # binary inputs: a sign quantizer on the layer input
            with graph.inserting_before(n):
                xq = graph.call_module(add(act_fq(1, sign=True), f"binary input of {paths[n.name] or n.name}"),
                                       (n.args[0],))
            n.replace_input_with(n.args[0], xq)

    if scheme.activations is not None:
        shared: dict[fx.Node, str] = {}
        for n in list(graph.nodes):
            if n.op not in ("placeholder", "call_function") or not _float_tensor(n):
                continue
            users = list(n.users)
            if fuses_clamp(n) and len(users) == 1 and is_op(users[0], *CLAMPS):
                continue  # quantized after the activation, which folds into the output range
            bits = info.layer_bits.get(n.name, LayerQuant(8, scheme.activations)).activations
            bits = 8 if bits in (1, None) or (n.op == "placeholder" and scheme.keep_first_last_8bit) else bits
            name = shared.get(_shares_params_with(n))  # the source's observer node: users read it now
            if name is None:
                name = add(act_fq(bits), f"activation {n.name}")
            with graph.inserting_after(n):
                obs = graph.call_module(name, (n,))
            shared[obs] = name
            n.replace_all_uses_with(obs, delete_user_cb=lambda u: u is not obs)  # noqa: B023  called here, at once
    graph.lint()
    gm.recompile()
    gm.meta["graphopt_quant"] = info
    if qat:
        for p in gm.parameters():
            p.requires_grad_(True)
    return gm


def _fake_quantizers(gm: nn.Module) -> list[FakeQuantize]:
    return [m for m in gm.modules() if isinstance(m, FakeQuantize)]


def _batches(calibration, example_inputs: tuple) -> Iterable[tuple]:
    n = len(example_inputs)
    for i, batch in enumerate(calibration):
        batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
        batch = batch[:n]  # (inputs..., labels) loaders
        for b, ex in zip(batch, example_inputs, strict=False):
            if not isinstance(b, torch.Tensor) or b.shape[1:] != ex.shape[1:] or b.dtype != ex.dtype:
                got = (tuple(b.shape), str(b.dtype)) if isinstance(b, torch.Tensor) else type(b).__name__
                raise QuantizationError(f"calibration batch {i} has an input {got}; expected shape "
                                        f"(N, {', '.join(map(str, ex.shape[1:]))}) {ex.dtype} like example_inputs")
        if len(batch) != n:
            raise QuantizationError(f"calibration batch {i} has {len(batch)} input(s); the model takes {n}")
        yield batch


def _check_calibration(calibration) -> None:
    """Refuse what is not an iterable of batches before any capture work (a bare tensor would be
    iterated sample by sample)."""
    if isinstance(calibration, torch.Tensor) or not isinstance(calibration, Iterable):
        got = "a single tensor" if isinstance(calibration, torch.Tensor) else repr(calibration)[:60]
        raise QuantizationError(f"calibration must be an iterable of input batches (a list like [x1, x2], a "
                                f"DataLoader, or [example_inputs] to calibrate on the example), got {got}")


def _run_calibration(gm: fx.GraphModule, calibration, args: tuple) -> None:
    """Observe every calibration batch; a graph specialized to the example's batch size sees each
    batch in slices of that size."""
    seen, step = 0, _static_batch(gm)
    with torch.no_grad():
        for batch in _batches(calibration, args):
            size = batch[0].shape[0] if batch[0].dim() else 1
            if step is None or size == step:
                gm(*batch)
            elif size % step:
                raise QuantizationError(f"calibration batch {seen} has {size} samples; the model captures only "
                                        f"with a fixed batch of {step} (batch-dependent code), so calibration "
                                        f"batches must hold a multiple of {step}")
            else:
                for i in range(0, size, step):
                    gm(*(b[i:i + step] for b in batch))
            seen += 1
    if not seen:
        raise QuantizationError("the calibration set is empty; pass an iterable of input batches")


def quantize(model: nn.Module, example_inputs, calibration, scheme: QuantScheme = QuantScheme()) -> fx.GraphModule:
    """Post-training quantization: observe ``calibration`` batches, return the QDQ-form module."""
    _check_calibration(calibration)
    args = check_example_inputs(example_inputs)
    gm = prepare_observed(model, args, scheme, qat=False)
    _run_calibration(gm, calibration, args)
    return convert(gm)


def prepare_qat(model: nn.Module, example_inputs, scheme: QuantScheme = QuantScheme(), *,
                calibration=None) -> fx.GraphModule:
    """Quantization-aware training: a trainable fx module with fake quantizers (straight-through).

    Ranges are initialized on ``calibration`` (default: the example inputs); with
    ``scheme.learnable_scales`` the scales then become parameters, else observers keep tracking
    ranges while training (moving average for activations, current weights). Train it like the
    original model, then `convert` it. A model built from scratch trains the same way.
    """
    if calibration is not None:
        _check_calibration(calibration)
    args = check_example_inputs(example_inputs)
    gm = prepare_observed(model, args, scheme, qat=True)
    _run_calibration(gm, calibration if calibration is not None else [args], args)
    for fq in _fake_quantizers(gm):
        fq.fake_quant = True
        if scheme.learnable_scales:
            fq.make_learnable()
    info: _Prepared = gm.meta["graphopt_quant"]
    info.initial = {k: v.detach().clone() for k, v in gm.named_parameters()}
    gm.train()
    return gm


def binarize(model: nn.Module, example_inputs, *, keep_first_last: bool = True, binary_activations: bool = False,
             calibration=None) -> fx.GraphModule:
    """XNOR-Net style QAT module: weights sign(W)·α with α = mean|W| per output channel, optional
    sign activations (then a binary layer's dot product is K − 2·popcount(a XOR w)); first/last
    layers 8-bit when ``keep_first_last``. Train it — best distilled from ``model``
    (``graphopt.distill(bm, model, data)``) — then `convert`. Binary activations train well in the
    Bi-Real form: a real-valued (8-bit) shortcut around each binary conv, whose batch norm (folded
    into α and the bias) precedes the next sign; see ``benchmarks/compression.py``."""
    scheme = QuantScheme(weights=1, activations=1 if binary_activations else 8, keep_first_last_8bit=keep_first_last)
    return prepare_qat(model, example_inputs, scheme, calibration=calibration)


def convert(qm: fx.GraphModule) -> fx.GraphModule:
    """Replace fake quantizers by quantize/dequantize nodes and weights by int8 constants (QDQ form)."""
    info = qm.meta.get("graphopt_quant") if isinstance(qm, fx.GraphModule) else None
    if not isinstance(info, _Prepared):
        raise QuantizationError("convert() takes a module from graphopt.prepare_qat or graphopt.binarize "
                                f"(got {type(qm).__name__}); graphopt.quantize already returns converted modules")
    if info.qat and all(torch.equal(p.detach(), info.initial[k]) for k, p in qm.named_parameters()
                        if k in info.initial):
        raise QuantizationError("this QAT module has not been trained: no parameter changed since prepare_qat. "
                                "Run at least one optimizer step (or use graphopt.quantize for PTQ).")
    gm = copy.deepcopy(qm)
    gm.eval()
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op != "call_module" or not isinstance(gm.get_submodule(n.target), FakeQuantize):
            continue
        fq: FakeQuantize = gm.get_submodule(n.target)
        if not fq.calibrated:
            raise QuantizationError(f"{fq.what} was never observed (no calibration data reached it)")
        src = n.args[0]
        with graph.inserting_before(n):
            if fq.weight:
                w = get_attr_value(gm, src.target)
                _check_finite(w, fq.what)
                scale, zp = fq.qparams(w.detach())
                w_int = _const(gm, graph, f"{src.target}_int", fq.quantize_int(w))
                out = graph.call_function(qd.dequantize_per_channel.default, (
                    w_int, _const(gm, graph, f"{src.target}_scale", scale.detach().float()),
                    _const(gm, graph, f"{src.target}_zp", zp), 0, fq.qmin, fq.qmax, torch.int8))
            elif fq.sign:
                scale, _ = fq.qparams()
                q = graph.call_function(torch.ops.graphopt.quantize_sign.default, (src,))
                out = graph.call_function(qd.dequantize_per_tensor.default, (q, float(scale), 0, -1, 1, torch.int8))
            else:
                scale, zp = fq.qparams()
                qargs = (float(scale.detach()), int(zp), fq.qmin, fq.qmax, torch.int8)
                q = graph.call_function(qd.quantize_per_tensor.default, (src, *qargs))
                out = graph.call_function(qd.dequantize_per_tensor.default, (q, *qargs))
        n.replace_all_uses_with(out)
        graph.erase_node(n)
    graph.eliminate_dead_code()
    _bias_on_accumulator_grid(gm)
    _bn_offset_on_accumulator_grid(gm)
    for name in [name for name, m in gm.named_children() if isinstance(m, FakeQuantize)]:
        delattr(gm, name)
    from graphopt.passes.graph import delete_unused_attributes

    delete_unused_attributes(gm)
    graph.lint()
    gm.recompile()
    gm.meta.pop("graphopt_quant", None)
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm


def _bias_on_accumulator_grid(gm: fx.GraphModule) -> None:
    """Round each quantized conv/linear's bias to its accumulator unit sx·sw_c, as the integer graph
    adds it (an int32 in that unit; ONNX's QDQ form quantizes biases the same way). The QDQ module then
    computes what the deployed model computes: with a float bias, the up to ½·sx·sw_c/so of an output
    step it differs by moved 0.1–0.5 % of each layer's outputs across a rounding edge, and deep graphs
    amplify such flips to several output steps. (A bias beyond int32 in that unit moves by a
    negligible 2^-31 of itself; `FoldQDQ` gives that channel a coarser unit.)"""
    for n in gm.graph.nodes:
        if not is_op(n, *_LAYERS):
            continue
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if not (is_op(x, qd.dequantize_per_tensor.default) and is_op(w, qd.dequantize_per_channel.default)
                and isinstance(b, fx.Node) and b.op == "get_attr"):
            continue
        value = get_attr_value(gm, b.target)
        unit = float(x.args[1]) * get_attr_value(gm, w.args[1].target).to(torch.float64)
        grid = (torch.round(value.to(torch.float64) / unit) * unit).to(value.dtype)
        with gm.graph.inserting_before(n):
            new = _const(gm, gm.graph, f"{b.target}_grid", grid)
        n.replace_input_with(b, new)


def _bn_offset_on_accumulator_grid(gm: fx.GraphModule) -> None:
    """The same for a BatchNorm on a quantized input (one no conv absorbed, e.g. after a concat), which
    `FoldQDQ` folds into the per-channel affine a_c·x + b_c: β moves so that b_c = β_c − μ_c·a_c is a
    whole number of the affine's accumulator units (`fold_qdq.affine_unit`)."""
    for n in gm.graph.nodes:
        parts = bn_parts(n)
        if parts is None or not is_op(parts[0], qd.dequantize_per_tensor.default):
            continue
        x, gamma_n, beta_n, mean_n, var_n, eps, training, _ = parts
        if training or any(not isinstance(t, fx.Node) or t.op != "get_attr" for t in (gamma_n, beta_n, mean_n, var_n)):
            continue
        gamma, beta, mean, var = (get_attr_value(gm, t.target) for t in (gamma_n, beta_n, mean_n, var_n))
        a = gamma.to(torch.float64) / torch.sqrt(var.to(torch.float64) + eps)
        unit = affine_unit(float(x.args[1]), a)
        offset = torch.round((beta.to(torch.float64) - mean.to(torch.float64) * a) / unit) * unit
        with gm.graph.inserting_before(n):
            new = _const(gm, gm.graph, f"{beta_n.target}_grid", (offset + mean.to(torch.float64) * a).to(beta.dtype))
        n.replace_input_with(beta_n, new)


def _const(gm: fx.GraphModule, graph: fx.Graph, hint: str, value: torch.Tensor) -> fx.Node:
    name, i = hint.replace(".", "_"), 0
    while hasattr(gm, name):
        i += 1
        name = f"{hint.replace('.', '_')}_{i}"
    gm.register_buffer(name, value.detach().clone())
    return graph.get_attr(name)


def to_integer(qm: nn.Module, example_inputs) -> fx.GraphModule:
    """Capture a QDQ-form module and fold it into graphopt's integer operators (what compile lowers)."""
    from graphopt.passes.fold_qdq import FoldQDQ

    args = check_example_inputs(example_inputs)
    gm = _capture_any_batch(qm, args)
    return FoldQDQ().run(gm, PassContext(args, None, {Property.ATEN})).graph_module
