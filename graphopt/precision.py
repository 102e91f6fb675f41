"""Per-layer weight bit widths chosen by sensitivity under a weight-size budget.

    sens = graphopt.layer_sensitivity(model, (x,), calibration, val_data, bits=(4, 2))
    plan = graphopt.precision(sens, budget_bytes=12_000)
    qat = graphopt.prepare_qat(model, (x,), plan.scheme, calibration=calibration)   # train, convert

A layer's sensitivity at b bits is the validation accuracy lost when that layer *alone* has b-bit
weights and every other layer stays as the base scheme has it (post-training quantization, the
base scheme's observers). `mixed_precision` starts every layer at the base width and lowers, one
step at a time, the layer whose next step costs the least accuracy per byte saved, until the conv/
linear weights fit ``budget_bytes`` (weights only, packed: numel · bits / 8). The result is a
`QuantScheme` with one override per layer, so `prepare_qat`/`quantize` build it unchanged.

Refuses (`QuantizationError`): bit widths the scheme does not support, a budget below what the
lowest widths reach (the error gives that minimum), a base scheme with per-layer overrides.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from torch import nn

from graphopt.errors import QuantizationError
from graphopt.passes.graph import get_attr_value
from graphopt.quantization import WEIGHT_BITS, LayerQuant, QuantScheme, prepare_observed, quantize
from graphopt.source import node_module


@dataclass
class Sensitivity:
    """Validation accuracy with every layer at the base scheme, and with one layer at each width."""

    base: QuantScheme
    accuracy: float  # the base scheme, all layers
    sizes: dict[str, int] = field(default_factory=dict)  # layer path → weight count
    base_bits: dict[str, int] = field(default_factory=dict)  # layer path → its width under the base scheme
    activations: dict[str, int | None] = field(default_factory=dict)  # layer path → its activation bits
    drops: dict[str, dict[int, float]] = field(default_factory=dict)  # path → {bits: accuracy lost}

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "sizes": self.sizes, "base_bits": self.base_bits,
                "drops": {p: {str(b): d for b, d in v.items()} for p, v in self.drops.items()}}


@dataclass
class MixedPrecision:
    """The chosen widths: ``scheme`` (a `QuantScheme` with one override per layer) and what it costs."""

    scheme: QuantScheme
    bits: dict[str, int]  # layer path → weight bits
    weight_bytes: int
    predicted_drop: float  # sum of the chosen widths' single-layer drops (an estimate)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "weight_bytes": self.weight_bytes, "predicted_drop": self.predicted_drop}


def _weight_bytes(sizes: dict[str, int], bits: dict[str, int]) -> int:
    return sum((sizes[p] * bits[p] + 7) // 8 for p in sizes)


def layer_sensitivity(model: nn.Module, example_inputs, calibration, val_data: Iterable, *,
                      bits: Sequence[int] = (4, 2), base: QuantScheme | None = None) -> Sensitivity:
    """Accuracy lost on ``val_data`` (batches ``(x, y)``) when each conv/linear layer alone gets each
    of ``bits``; everything else as in ``base`` (default int8 weights and activations)."""
    from graphopt.training import evaluate

    base = QuantScheme() if base is None else base
    if not isinstance(base, QuantScheme) or base.overrides:
        raise QuantizationError("base must be a graphopt.QuantScheme without overrides (the search sets them)")
    bad = [b for b in bits if b not in WEIGHT_BITS]
    if not bits or bad:
        raise QuantizationError(f"bits {list(bits)!r} must be a non-empty list of weight widths from {WEIGHT_BITS}")
    calibration = list(calibration)
    gm = prepare_observed(model, example_inputs, base, qat=False)
    layers = [n for n in gm.graph.nodes if n.name in gm.meta["graphopt_quant"].layer_bits]
    paths = [node_module(n) for n in layers]
    if not layers or len(set(paths)) != len(paths) or not all(paths):
        raise QuantizationError(f"layers must be distinct conv/linear modules to get a width each; found {paths}")
    weights = [n.args[1].args[0] if n.args[1].op == "call_module" else n.args[1] for n in layers]  # under its quantizer
    sizes = {p: int(get_attr_value(gm, w.target).numel()) for p, w in zip(paths, weights, strict=True)}
    per_layer = {p: base.for_layer(p, i in (0, len(paths) - 1)) for i, p in enumerate(paths)}
    reference = evaluate(quantize(model, example_inputs, calibration, base), val_data)
    sens = Sensitivity(base, reference, sizes, {p: lq.weights or 32 for p, lq in per_layer.items()},
                       {p: lq.activations for p, lq in per_layer.items()})
    for p in paths:
        sens.drops[p] = {}
        for b in bits:
            scheme = replace(base, overrides={p: LayerQuant(b, per_layer[p].activations)})
            sens.drops[p][b] = reference - evaluate(quantize(model, example_inputs, calibration, scheme), val_data)
    return sens


def mixed_precision(sensitivity: Sensitivity, budget_bytes: int) -> MixedPrecision:
    """Lower layers' widths greedily (least accuracy lost per byte saved first) until the weights fit."""
    s = sensitivity
    bits = dict(s.base_bits)
    ladder = {p: sorted({b for b in s.drops[p] if b < s.base_bits[p]}, reverse=True) for p in s.sizes}
    lowest = {p: (ladder[p][-1] if ladder[p] else bits[p]) for p in s.sizes}
    if _weight_bytes(s.sizes, lowest) > budget_bytes:
        raise QuantizationError(f"budget {budget_bytes:,} B is below {_weight_bytes(s.sizes, lowest):,} B, the "
                                "weights at the lowest measured widths; raise the budget or measure lower widths")

    def drop(p: str, b: int) -> float:
        return s.drops[p].get(b, 0.0) if b < s.base_bits[p] else 0.0

    while _weight_bytes(s.sizes, bits) > budget_bytes:
        best = None
        for p in s.sizes:
            lower = [b for b in ladder[p] if b < bits[p]]
            if not lower:
                continue
            nb = lower[0]
            saved = (s.sizes[p] * bits[p] + 7) // 8 - (s.sizes[p] * nb + 7) // 8
            cost = (max(drop(p, nb), 0.0) - max(drop(p, bits[p]), 0.0)) / max(saved, 1)
            if best is None or cost < best[0]:
                best = (cost, p, nb)
        assert best is not None  # the loop ends when no layer has a lower width left
        bits[best[1]] = best[2]
    overrides = {p: LayerQuant(None if bits[p] == 32 else bits[p], s.activations[p]) for p in s.sizes}
    scheme = replace(s.base, overrides=overrides)
    return MixedPrecision(scheme, bits, _weight_bytes(s.sizes, bits), sum(max(drop(p, bits[p]), 0.0) for p in bits))
