"""Every common CNN block folds into graphopt's integer ops, with the oracles of the other folds:
the folded fx graph equals the numpy reference (graphopt.qref) bit for bit, each op is within its
documented step bound of the QDQ form (exact for tables, clamps and data movement), no float op is
left between quantize and dequantize, and the true cost (MACs by precision, params, bytes) comes
from the ops' own definitions. Compiled artifacts are checked in `test_qfold_compile.py`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import cnn_models
import graphopt
from graphopt import qref
from graphopt.analysis import analyze
from graphopt.capture import capture
from qdq_oracle import fold, per_op_steps

aten, g = torch.ops.aten, torch.ops.graphopt


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; OpenMP spinning on a shared machine costs far more
    yield
    torch.set_num_threads(threads)


class Block(nn.Module):
    """conv → <block> → conv, so the block sits between quantized values as in a real network."""

    def __init__(self, fn, cin=3, mid=8):
        super().__init__()
        self.fn = fn
        self.c1, self.c2, self.bn = nn.Conv2d(cin, mid, 3, padding=1), nn.Conv2d(mid, mid, 1), nn.BatchNorm2d(mid)
        self.dw = nn.Conv2d(mid, 2 * mid, 1, stride=2, groups=mid)  # 1×1 depthwise, channel multiplier 2
        self.register_buffer("gain", torch.linspace(-1.0, 2.0, mid).reshape(mid, 1, 1))  # layer-scale style
        self.head = nn.LazyConv2d(4, 1)

    def forward(self, x):
        y = F.relu(self.c1(x)) - 0.25  # mixed signs for the block
        return self.head(self.fn(self, y))


def _bn_stats(m: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            with torch.no_grad():
                b.weight.uniform_(-1.5, 1.5, generator=gen)  # negative scales too
                b.bias.uniform_(-0.5, 0.5, generator=gen)
                b.running_mean.normal_(0, 0.3, generator=gen)
                b.running_var.uniform_(0.3, 2.0, generator=gen)
    return m.eval()


BLOCKS = {  # name → (forward of the block, op kinds the fold must produce)
    "relu_standalone": (lambda m, y: F.relu(F.max_pool2d(m.c2(y), 2)), {"clamp"}),
    "relu6_standalone": (lambda m, y: F.relu6(F.max_pool2d(m.c2(y), 2)), {"qlut"}),
    "relu_after_cat": (lambda m, y: F.relu(torch.cat([m.c2(y), y], 1)), {"requantize"}),
    "hardtanh_clamp": (lambda m, y: torch.clamp(F.hardtanh(y * 3.0, -1.0, 0.5), min=-0.5), {"qlut"}),
    "residual_add_relu": (lambda m, y: F.relu(m.c2(y) + y), {"qadd"}),
    "broadcast_add": (lambda m, y: m.c2(y) + y.mean((2, 3), keepdim=True), {"qadd"}),
    "max_pool": (lambda m, y: F.max_pool2d(F.relu(m.c2(y)), 3, 2, 1), {"max_pool2d"}),
    "max_pool_ceil": (lambda m, y: F.max_pool2d(m.c2(y), 2, 2, ceil_mode=True), {"max_pool2d"}),
    "avg_pool": (lambda m, y: F.avg_pool2d(m.c2(y), 3, 2, 1), {"qsum_pool2d"}),
    "avg_pool_ceil_exact": (lambda m, y: F.avg_pool2d(m.c2(y), 3, 3, ceil_mode=True, count_include_pad=False),
                            {"qsum_pool2d"}),  # 9×9 in 3×3 windows: no partial window, no padding
    "avg_pool_1x1_stride2": (lambda m, y: F.avg_pool2d(m.c2(y), 1, 2), {"qsum_pool2d"}),
    "pool_of_pooled": (lambda m, y: F.adaptive_avg_pool2d(F.adaptive_avg_pool2d(y, 1), 1) + m.c2(y), {"qadd"}),
    "depthwise_1x1_multiplier": (lambda m, y: m.dw(y), {"qconv2d"}),
    "global_pool_mean": (lambda m, y: m.c2(y).mean((2, 3), keepdim=True) + F.adaptive_avg_pool2d(y, 1),
                         {"qsum_pool2d"}),
    "se_sigmoid": (lambda m, y: y * torch.sigmoid(m.c2(F.adaptive_avg_pool2d(y, 1))), {"qmul", "qlut"}),
    "se_hardsigmoid": (lambda m, y: y * F.hardsigmoid(m.c2(F.adaptive_avg_pool2d(y, 1))), {"qmul", "qlut"}),
    "silu_as_mul": (lambda m, y: m.c2(y) * torch.sigmoid(m.c2(y)), {"qmul"}),
    "luts": (lambda m, y: torch.cat([F.silu(m.c2(y)), F.hardswish(y), F.gelu(y), torch.tanh(y), torch.sigmoid(y),
                                     F.leaky_relu(y, 0.1), F.elu(y)], 1), {"qlut"}),
    "scalar_arithmetic": (lambda m, y: F.relu6(m.c2(y) + 3.0) / 6.0 + (1.0 - 0.5 * y), {"qlut"}),
    "subtract": (lambda m, y: m.c2(y) - y, {"qadd"}),
    "concat_rescale": (lambda m, y: torch.cat([m.c2(y) * 4.0, y], 1), {"requantize"}),
    "preact_bn_after_cat": (lambda m, y: F.relu(m.bn(torch.cat([m.c2(y), y], 1)[:, :8])), {"qconv2d"}),
    "channel_constant": (lambda m, y: F.relu(m.c2(y)) * m.gain + m.gain, {"qconv2d"}),
    "views": (lambda m, y: m.c2(y).flatten(2).transpose(1, 2).reshape(1, -1, 8).permute(0, 2, 1)
              .reshape(y.shape), set()),
    "select_row": (lambda m, y: m.c2(y).select(2, 1).unsqueeze(2) + y[:, :, :1], {"qadd"}),  # x[:, 0]-style
    "chunk": (lambda m, y: torch.cat(list(reversed(m.c2(y).chunk(2, 1))), 1) + y, {"slice"}),
    "dropout": (lambda m, y: F.dropout(m.c2(y), 0.3, training=False), set()),
    "zero_pad": (lambda m, y: F.pad(F.relu6(m.c2(y)), (0, 1, 1, 0)), {"constant_pad_nd"}),  # TF-style "same"
    "value_and_reflect_pad": (lambda m, y: F.pad(F.pad(m.c2(y), (1, 1, 1, 1), value=0.3), (1, 1, 0, 0), "reflect"),
                              {"constant_pad_nd", "pad"}),
}


def _quantized(fn, x):
    torch.manual_seed(0)
    model = _bn_stats(Block(fn))
    model(x)  # materialize the lazy head
    cal = [torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return graphopt.quantize(model, (x,), calibration=cal)


def _kinds(gm) -> set[str]:
    return {getattr(n.target, "_opname", getattr(n.target, "__name__", "")).split(".")[0]
            for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_folds_exactly_against_reference_and_within_its_bound(name):
    fn, expect = BLOCKS[name]
    x = torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    qm = _quantized(fn, x)
    pre, folded = fold(qm, (x,))
    ig = folded.graph_module
    assert folded.stats["float_ops"] == 0 and not folded.declined, folded.declined
    assert expect <= _kinds(ig), _kinds(ig)
    to_int = graphopt.to_integer(qm, (x,))  # the captured path compile takes: the same values
    for t in (x, torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(2))):
        got = ig(t).numpy()
        assert np.array_equal(got, qref.run(ig, (t,))[0])
        assert np.array_equal(got, to_int(t).numpy())
        for op in per_op_steps(pre, ig, (t,)):
            assert op.max_steps <= (0 if op.exact_form else 1), op


def test_max_pool_and_views_need_no_requantize():
    """The quantizer shares max pooling's and views' params with their input: int8 data movement."""
    x = torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    ig = fold(_quantized(lambda m, y: F.max_pool2d(m.c2(y), 2).flatten(1).view(1, 8, 4, 4), x), (x,))[1].graph_module
    pool = next(n for n in ig.graph.nodes if n.target is aten.max_pool2d.default)
    chain = list(pool.users)
    assert all(u.target in (aten.flatten.using_ints, aten.view.default) for u in chain)


def test_standalone_relu_is_an_int8_clamp_and_relu6_a_table():
    x = torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    relu = fold(_quantized(BLOCKS["relu_standalone"][0], x), (x,))[1].graph_module
    clamp = next(n for n in relu.graph.nodes if n.target is aten.clamp.default)
    assert clamp.args[0].target is aten.max_pool2d.default and [u.target for u in clamp.users] == [g.qconv2d.default]
    relu6 = fold(_quantized(BLOCKS["relu6_standalone"][0], x), (x,))[1].graph_module
    pool = next(n for n in relu6.graph.nodes if n.target is aten.max_pool2d.default)
    assert [u.target for u in pool.users] == [g.qlut.default]


@pytest.mark.parametrize("name", sorted(cnn_models.MODELS))
def test_torchvision_style_model_has_no_float_op_left(name):
    """ResNet-18, MobileNetV2/V3, EfficientNet-B0, DenseNet and ShuffleNetV2 written as torchvision
    writes them (in-place activations and adds): every op between the input quantize and the output
    dequantize is integer, equal to the numpy reference and within its step bound of QDQ."""
    model, x = cnn_models.build(name)
    qm = graphopt.quantize(model, (x,), calibration=cnn_models.calibration(n=2))
    pre, folded = fold(qm, (x,))
    ig = folded.graph_module
    assert folded.stats["float_ops"] == 0 and not folded.declined, folded.declined
    assert np.array_equal(ig(x).numpy(), qref.run(ig, (x,))[0])
    assert all(op.max_steps <= (0 if op.exact_form else 1) for op in per_op_steps(pre, ig, (x,)))


def _cost(model, x, scheme=graphopt.QuantScheme(), qat=False):
    if qat:
        prepared = graphopt.prepare_qat(model, (x,), scheme=scheme)
        with torch.no_grad():
            next(prepared.parameters()).mul_(1.001)  # "trained"
        qm = graphopt.convert(prepared)
    else:
        qm = graphopt.quantize(model, (x,), calibration=cnn_models.calibration(n=1), scheme=scheme)
    return analyze(graphopt.to_integer(qm, (x,)), (x,))


def test_integer_graph_reports_true_macs_params_and_bytes():
    """MACs: a folded int8 graph has the float graph's MACs (the ops state their own); low-bit
    weights count as weights, not as packed bytes, and only the bytes shrink."""
    model, x = cnn_models.build("resnet18")
    fp32 = analyze(capture(model, (x,)).graph_module, (x,))
    int8 = _cost(model, x)
    assert int8.macs == fp32.macs and int8.macs_by_precision == {"w8a8": fp32.macs}
    int4 = _cost(model, x, graphopt.QuantScheme(weights=4), qat=True)
    first_last = fp32.macs_by_module["conv1"] + fp32.macs_by_module["fc"]
    assert int4.macs == fp32.macs and int4.macs_by_precision == {"w8a8": first_last, "w4a8": fp32.macs - first_last}
    packed = [m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]
    assert int4.params == int8.params  # the same constants, each weight counted once
    assert int8.param_bytes - int4.param_bytes == sum(n - (n + 1) // 2 for n in packed)


def test_binary_layers_report_w1a1_macs():
    model, x = cnn_models.build("resnet18")
    bm = graphopt.binarize(model, (x,), binary_activations=True)
    with torch.no_grad():
        next(bm.parameters()).mul_(1.001)
    cost = analyze(graphopt.to_integer(graphopt.convert(bm), (x,)), (x,))
    fp32 = analyze(capture(model, (x,)).graph_module, (x,))
    assert cost.macs == fp32.macs and {"w1a1", "w8a8"} == set(cost.macs_by_precision)


def test_standalone_batchnorm_costs_its_depthwise_macs():
    """A BatchNorm no conv absorbs becomes a per-channel integer affine: C·H·W multiplies (float BN
    counts none), everything else unchanged."""
    model, x = cnn_models.build("densenet")
    fp32 = analyze(capture(model, (x,)).graph_module, (x,))
    int8 = _cost(model, x)
    graph = capture(model, (x,)).graph_module
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(graph).propagate(x)
    affine = sum(n.meta["tensor_meta"].shape.numel() for n in graph.graph.nodes
                 if n.target is aten.batch_norm.default and n.args[0].target is not aten.conv2d.default)
    assert affine and int8.macs == fp32.macs + affine
