"""Quantization API, QDQ folding and the integer contract, in PyTorch and the numpy reference (no TVM)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphopt
from graphopt import qops, qref
from graphopt.capture import capture
from graphopt.passes.base import PassContext, Property
from graphopt.passes.fold_qdq import FoldQDQ
from quant_models import PATTERNS, ConvBnRelu, Residual, calibration, ready

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
g = torch.ops.graphopt


def _ops(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def _out_qparams(qm):
    """(scale, zero point) of the final dequantize of a QDQ module."""
    out = list(qm.graph.nodes)[-1].args[0][0]
    return float(out.args[1]), int(out.args[2])


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_folds_to_integers_bit_exact_vs_reference(name):
    model = ready(PATTERNS[name]())
    qm = graphopt.quantize(model, (X,), calibration=calibration())
    ig = graphopt.to_integer(qm, (X,))
    float_compute = {n.target for n in ig.graph.nodes if n.op == "call_function"
                     and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default,
                                      torch.ops.aten.add.Tensor, torch.ops.aten.avg_pool2d.default)}
    assert not float_compute, f"left in float: {float_compute}"
    got = ig(X)
    ref = qref.run(ig, (X,))[0]
    assert np.array_equal(got.numpy(), ref)  # the integer graph in PyTorch == numpy reference, bit for bit
    # end to end, a 1-LSB difference in one layer can move later layers by more: most outputs agree within 1
    scale, _ = _out_qparams(qm)
    lsb = ((got - qm(X)).abs() / scale).round()
    assert (lsb <= 1).float().mean() >= 0.98 and lsb.max() <= 4


class _OneOp(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x, y):
        return self.op(self, x, y)


ONE_OP = {
    "conv_relu": lambda m, x, y: torch.relu(m.conv(x)),
    "linear": lambda m, x, y: m.fc(x),
    "add_relu": lambda m, x, y: torch.relu(x + y),
    "cat": lambda m, x, y: torch.cat([x, y], dim=1),
    "avg_pool": lambda m, x, y: nn.functional.avg_pool2d(x, 2),
    "global_mean": lambda m, x, y: x.mean(dim=(2, 3)),
    "max_pool": lambda m, x, y: nn.functional.max_pool2d(x, 2),
    "hardswish": lambda m, x, y: nn.functional.hardswish(x),
    "matmul": lambda m, x, y: x @ y.transpose(-1, -2),
}


@pytest.mark.parametrize("name", sorted(ONE_OP))
def test_single_folded_op_within_one_lsb_of_qdq_simulation(name):
    model = _OneOp(ONE_OP[name]).eval()
    pairs = [(x, 3 * x.flip(0)) for x in calibration(8)]  # second input at another scale
    qm = graphopt.quantize(model, pairs[0], calibration=pairs)
    ig = graphopt.to_integer(qm, pairs[0])
    scale, _ = _out_qparams(qm)
    for x, y in pairs:
        got = ig(x, y)
        assert ((got - qm(x, y)).abs().max() / scale).item() <= 1.0 + 1e-4
        assert np.array_equal(got.numpy(), qref.run(ig, (x, y))[0])


def test_fold_reports_what_it_folded_and_is_idempotent():
    qm = graphopt.quantize(ready(Residual()), (X,), calibration=calibration())
    gm = capture(qm, (X,)).graph_module
    ctx = PassContext((X,), None, {Property.ATEN})
    first = FoldQDQ().run(gm, ctx)
    assert first.modified and first.stats["conv2d"] == 3 and first.stats["add"] == 1
    assert {g.qconv2d.default, g.requantize.default, g.qadd.default} <= _ops(first.graph_module)
    second = FoldQDQ().run(first.graph_module, ctx)
    assert not second.modified


def test_fold_is_a_noop_on_float_graphs():
    gm = capture(ready(ConvBnRelu()), (X,)).graph_module
    r = FoldQDQ().run(gm, PassContext((X,), None, {Property.ATEN}))
    assert not r.modified and not r.declined


def test_unfoldable_pattern_is_declined_with_reason_and_still_runs():
    class Softmaxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.softmax(self.conv(x), dim=1)

    qm = graphopt.quantize(Softmaxed().eval(), (X,), calibration=calibration())
    gm = capture(qm, (X,)).graph_module
    r = FoldQDQ().run(gm, PassContext((X,), None, {Property.ATEN}))
    assert any("softmax" in d.reason and "QDQ" in d.reason for d in r.declined)
    assert g.qconv2d.default in _ops(r.graph_module)
    torch.testing.assert_close(r.graph_module(X), qm(X), atol=2 * _out_qparams(qm)[0], rtol=0)


def test_weight_only_is_declined_as_fp32_compute():
    qm = graphopt.quantize(ready(ConvBnRelu()), (X,), calibration=calibration(),
                           scheme=graphopt.QuantScheme(weights=8, activations=None))
    r = FoldQDQ().run(capture(qm, (X,)).graph_module, PassContext((X,), None, {Property.ATEN}))
    assert not r.modified and len([d for d in r.declined if "weight-only" in d.reason]) == 2


def test_requantize_matches_float_rounding_within_one():
    acc = torch.randint(-2 ** 20, 2 ** 20, (4096,), dtype=torch.int32)
    for real in (0.0001234, 0.37, 0.999, 1.5, 3.0e-7):
        m, s = qops.multiplier_tensors([real])
        got = g.requantize(acc, 0, m, s, 0, 0, -2 ** 7, 2 ** 7 - 1).to(torch.int64)
        want = torch.clamp(torch.round(acc.double() * real), -128, 127).to(torch.int64)
        assert (got - want).abs().max() <= 1
        assert np.array_equal(got.numpy(), qref.requantize(acc.numpy(), 0, m.numpy(), s.numpy(), 0, 0, -128, 127))


def test_xnor_popcount_equals_integer_dot():
    gen = torch.Generator().manual_seed(3)
    a = (torch.randint(0, 2, (5, 77), generator=gen) * 2 - 1).numpy()
    w = (torch.randint(0, 2, (6, 77), generator=gen) * 2 - 1).numpy()
    assert np.array_equal(qref.xnor_popcount_dot(a, w), a @ w.T)


@pytest.mark.parametrize("bits,ratio", [(8, 4.0), (4, 8.0), (2, 16.0), (1, 32.0)])
def test_weight_storage_shrinks_with_bits(bits, ratio):
    scheme = graphopt.QuantScheme(weights=bits, activations=8, keep_first_last_8bit=False)
    model = ready(Residual())
    prepared = graphopt.prepare_qat(model, (X,), scheme=scheme)
    with torch.no_grad():
        next(prepared.parameters()).add_(1e-3)  # "trained"
    ig_stats = FoldQDQ().run(capture(graphopt.convert(prepared), (X,)).graph_module,
                             PassContext((X,), None, {Property.ATEN})).stats
    assert ig_stats["weight_bytes_fp32"] / ig_stats["weight_bytes"] == pytest.approx(ratio, rel=0.02)
    if bits < 8:
        assert ig_stats[f"packed_int{bits}"] == 3


def test_low_bit_weights_are_packed_and_bit_exact():
    scheme = graphopt.QuantScheme(weights=4, activations=8)
    prepared = graphopt.prepare_qat(ready(Residual()), (X,), scheme=scheme)
    with torch.no_grad():
        next(prepared.parameters()).mul_(1.01)
    qm = graphopt.convert(prepared)
    ig = graphopt.to_integer(qm, (X,))
    assert g.unpack_bits.default in _ops(ig)
    assert np.array_equal(ig(X).numpy(), qref.run(ig, (X,))[0])


def test_binarized_layers_use_sign_weights_and_activations():
    bm = graphopt.binarize(ready(Residual()), (X,), binary_activations=True)
    opt = torch.optim.SGD(bm.parameters(), lr=0.01)
    loss = bm(X).square().mean()
    loss.backward()
    grads = [p.grad for p in bm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    opt.step()
    qm = graphopt.convert(bm)
    ig = graphopt.to_integer(qm, (X,))
    assert g.qsign.default in _ops(ig) and g.unpack_bits.default in _ops(ig)
    assert np.array_equal(ig(X).numpy(), qref.run(ig, (X,))[0])


def test_qat_trains_with_learnable_scales():
    torch.manual_seed(0)
    model = ready(ConvBnRelu())
    qat = graphopt.prepare_qat(model, (X,), scheme=graphopt.QuantScheme(weights=4, learnable_scales=True))
    scales = [m.scale_param for m in qat.modules() if getattr(m, "scale_param", None) is not None]
    assert scales
    before = [s.detach().clone() for s in scales]
    opt = torch.optim.Adam(qat.parameters(), lr=1e-2)
    target = torch.randn(2, 10)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(qat(X), target).backward()
        opt.step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, scales))
    qm = graphopt.convert(qat)
    assert torch.isfinite(qm(X)).all()


def test_per_layer_override_and_first_last_default():
    scheme = graphopt.QuantScheme(weights=4, overrides={"c2": graphopt.LayerQuant(weights=2)})
    prepared = graphopt.prepare_qat(ready(Residual()), (X,), scheme=scheme)
    from graphopt.quantize import FakeQuantize

    bits = {fq.what: fq.bits for fq in prepared.modules() if isinstance(fq, FakeQuantize) and fq.weight}
    assert bits == {"weight of c1": 8, "weight of c2": 2, "weight of c3": 8}


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs", [{"weights": 3}, {"activations": 16}, {"weights": 0}, {"observer": "fancy"},
                                    {"percentile": 20.0}])
def test_scheme_refuses_invalid_options(kwargs):
    with pytest.raises(graphopt.QuantizationError):
        graphopt.QuantScheme(**kwargs)


def test_scheme_is_frozen():
    s = graphopt.QuantScheme(overrides={"a": graphopt.LayerQuant(4, 8)})
    with pytest.raises(Exception):
        s.weights = 4
    with pytest.raises(TypeError):
        s.overrides["b"] = graphopt.LayerQuant()


def test_override_for_unknown_layer_is_refused():
    with pytest.raises(graphopt.QuantizationError, match="match no conv/linear"):
        graphopt.quantize(ready(Residual()), (X,), calibration=calibration(),
                          scheme=graphopt.QuantScheme(overrides={"nope": graphopt.LayerQuant(4)}))


def test_calibration_of_wrong_shape_is_refused():
    with pytest.raises(graphopt.QuantizationError, match=r"expected shape \(N, 3, 8, 8\)"):
        graphopt.quantize(ready(Residual()), (X,), calibration=[torch.randn(4, 3, 16, 16)])
    with pytest.raises(graphopt.QuantizationError, match="empty"):
        graphopt.quantize(ready(Residual()), (X,), calibration=[])


def test_calibration_with_labels_is_accepted():
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calibration()]
    qm = graphopt.quantize(ready(Residual()), (X,), calibration=data)
    assert torch.isfinite(qm(X)).all()


def test_qat_converted_before_training_is_refused():
    qat = graphopt.prepare_qat(ready(Residual()), (X,))
    with pytest.raises(graphopt.QuantizationError, match="not been trained"):
        graphopt.convert(qat)


def test_convert_refuses_unprepared_modules():
    with pytest.raises(graphopt.QuantizationError, match="prepare_qat"):
        graphopt.convert(ready(Residual()))


def test_nan_in_weights_or_activations_is_refused():
    bad = ready(Residual())
    with torch.no_grad():
        bad.c2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(graphopt.QuantizationError, match="NaN or inf"):
        graphopt.quantize(bad, (X,), calibration=calibration())
    cal = calibration()
    cal[1][0, 0, 0, 0] = float("inf")
    with pytest.raises(graphopt.QuantizationError, match="NaN or inf"):
        graphopt.quantize(ready(Residual()), (X,), calibration=cal)


@pytest.mark.parametrize("observer", list(graphopt.Observer))
def test_observers_give_usable_ranges(observer):
    scheme = graphopt.QuantScheme(observer=observer, weight_observer=observer)
    model = ready(Residual())
    qm = graphopt.quantize(model, (X,), calibration=calibration(), scheme=scheme)
    with torch.no_grad():
        ref = model(X)
    assert (qm(X) - ref).abs().max() < 0.25 * ref.abs().max()


class _BatchFromSize(nn.Module):
    """Old torchvision style: ``x.view(x.size(0), -1)``, and a batch-1-only ``squeeze()``."""

    def __init__(self, squeeze: bool):
        super().__init__()
        self.conv, self.fc, self.squeeze = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 5), squeeze

    def forward(self, x):
        y = self.fc(self.conv(x).view(x.size(0), -1))
        return y.squeeze() if self.squeeze else y


@pytest.mark.parametrize("squeeze", [False, True])
def test_batch_one_example_calibrates_on_larger_batches(squeeze):
    """torch.export specializes a batch of 1: view(x.size(0), -1) would become view(1, -1) and every
    calibration batch of 8 would fail; a batch-1-only graph (squeeze) is calibrated in slices."""
    model, x = _BatchFromSize(squeeze).eval(), X[:1]
    qm = graphopt.quantize(model, (x,), calibration=calibration())
    with torch.no_grad():
        want = model(x)
    assert qm(x).shape == want.shape and (qm(x) - want).abs().max() < 0.1 * want.abs().max()
