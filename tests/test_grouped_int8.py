"""Grouped and depthwise int8 convs (`int8.legalize_grouped_conv2d` + `schedules.GroupedInt8`, and on aarch64
with dotprod the depthwise 3×3 `int8.legalize_depthwise_dot` + `schedules.DepthwiseDot` and grouped convs
whose groups fit the dot kernels, `int8.legalize_grouped_dot` + `schedules.TensorizedDot`): the weight
packing against a float64 oracle, bit-exact outputs against the folded integer graph and `graphopt.qref`
on emulated ARM (int16 pair products, single products for layers with −128 weights, lane-wise ``sdot``),
and instruction counts showing the kernel paths are taken on aarch64. x86 keeps the generic kernel
(it has no int8×int8→int16 widening multiply) and stays exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_tools
from quant_models import Depthwise64
from torch import nn

import graphopt
from graphopt import qref
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.targets.lowering.int8 import grouped_channel_tile
from graphopt.targets.spec import Feature

SHAPE = (1, 3, 9, 9)


class Blocks(nn.Module):
    """Depthwise with multiplier 1 and 2, stride 1 and 2, padding, odd channel counts (13, 27 = 24 + 3),
    a 5×5 window (25 taps: an odd pair), grouped convs of group width 2 and 4, a 1×1 map, each followed by
    an in-place ReLU6 (as torchvision writes MobileNetV2)."""

    def __init__(self):
        super().__init__()
        act = nn.ReLU6(inplace=True)
        self.body = nn.Sequential(
            nn.Conv2d(3, 13, 1), act,
            nn.Conv2d(13, 13, 3, padding=1, groups=13), act,  # 13 channels, stride 1
            nn.Conv2d(13, 26, 3, stride=2, padding=1, groups=13), act,  # multiplier 2, stride 2: 5×5
            nn.Conv2d(26, 26, 3, padding=1, groups=13), act,  # group width 2
            nn.Conv2d(26, 27, 1), act,
            nn.Conv2d(27, 27, 5, padding=2, groups=27), act,  # 24 + 3 channels, 25 taps
            nn.Conv2d(27, 28, 1), act,
            nn.Conv2d(28, 28, 3, padding=1, groups=7), act,  # group width 4
            nn.Conv2d(28, 28, 5, stride=5, groups=28), act,  # to a 1×1 map
            nn.Conv2d(28, 28, 3, padding=1, groups=28), act)  # depthwise on a 1×1 map: one tap inside
        self.fc = nn.Linear(28, 5)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    signs = torch.sign(torch.randn(SHAPE, generator=g))
    return [torch.randn(SHAPE, generator=g), 3 * torch.randn(SHAPE, generator=g), 1e3 * signs,
            torch.full(SHAPE, -1e3)]


def _quantized(scheme: graphopt.QuantScheme):
    torch.manual_seed(0)
    model = Blocks().eval()
    x = _inputs()[0]
    calib = [(torch.randn(4, *SHAPE[1:], generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    q = graphopt.quantize(model, (x,), calib, scheme)
    return q, to_integer(q, (x,)), x


@pytest.fixture(scope="module", params=["minmax", "percentile"])
def quantized(request):
    """Plain weight ranges (int16 pair products), and clipped ones that round the most negative weights of
    every layer to −128 (products widened one at a time)."""
    scheme = graphopt.QuantScheme() if request.param == "minmax" else \
        graphopt.QuantScheme(weight_observer="percentile", percentile=90)
    q, ig, x = _quantized(scheme)
    grouped = [b for n, b in ig.named_buffers() if n.endswith("_weight_int") and b.dim() == 4 and b.shape[1] < 13]
    assert len(grouped) == 8
    assert any(int(w.min()) == -128 for w in grouped) == (request.param == "percentile")
    return q, ig, x


def _assert_exact(cm, ig, kernels: int = 7, depthwise: int = 0, grouped_dot: int = 0):
    # NEON: every grouped and depthwise conv but the last, which on a 1×1 map sees data at its centre
    # tap only and lowers as a per-channel scale fused with its neighbours; with dotprod the 13-channel
    # depthwise 3×3 takes the lane-wise sdot kernel instead, and the group-width-4 conv (4 outputs per
    # group: whole sdot lanes) a dense sdot kernel per group; x86: the generic kernel
    assert cm.report.lowering["scheduled"].get("grouped_int8", 0) == kernels
    assert cm.report.lowering["scheduled"].get("depthwise_dot", 0) == depthwise
    layers = [d["layer"] for d in cm.report.lowering.get("weight_storage", {}).get("layers", [])]
    assert sum("groups=" in layer for layer in layers) == grouped_dot, layers
    for inp in _inputs():
        want = ig(inp)
        got = cm(inp)
        assert torch.equal(got, want), f"max difference {(got.float() - want.float()).abs().max()}"
        assert np.array_equal(want.numpy(), qref.run(ig, [inp])[0])


def test_channel_tile():
    assert grouped_channel_tile(64, 1, 16) == 16
    assert grouped_channel_tile(24, 1, 16) == 8  # 24 = 3 × 8: no padding
    assert grouped_channel_tile(13, 1, 16) == 16  # padded to 16
    assert grouped_channel_tile(32, 8, 16) == 8  # a group's 8 outputs share one input channel per tap
    assert grouped_channel_tile(28, 4, 16) == 16  # 4 outputs per group: padded, lanes read 4 channels


def test_host_is_bit_exact(quantized):
    q, ig, x = quantized
    _assert_exact(graphopt.compile(q, (x,), "host", progress=False), ig, kernels=0)


@pytest.mark.emulation
def test_arm_a55_is_bit_exact(quantized):
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    q, ig, x = quantized
    _assert_exact(graphopt.compile(q, (x,), "arm-a55", progress=False, count_instructions=False), ig, 5, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["arm-a53", "arm-a76", "armv7"])
def test_other_arm_targets_are_bit_exact(quantized, target):
    require_tools(*(("arm-linux-gnueabihf-gcc", "qemu-arm") if target == "armv7"
                    else ("aarch64-linux-gnu-gcc", "qemu-aarch64")))
    q, ig, x = quantized
    dotprod = get_target(target).has(Feature.DOTPROD)
    # arm-a53: the group-width-4 conv reads its copied windows with a NEON dot kernel per group
    # (`int8.legalize_grouped_patches`; TVM's 4×4 one where a weight is −128)
    patched = target == "arm-a53"
    _assert_exact(graphopt.compile(q, (x,), target, progress=False, count_instructions=False), ig,
                  5 if dotprod else 7 - patched, int(dotprod), int(dotprod or patched))


@pytest.mark.emulation
def test_depthwise_kernel_instructions_per_mac_on_a53():
    """The depthwise layer, requantize epilogue included: 0.61 instructions per MAC measured on the grouped
    kernel (90,146 per call), 0.71 on the generic int32 kernel it replaced (103,998)."""
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import kernel_counts

    torch.manual_seed(0)
    x = torch.randn(1, 16, 16, 16)
    q = graphopt.quantize(Depthwise64().eval(), (x,), [(torch.randn(4, 16, 16, 16),)])
    spec = get_target("arm-a53")
    lowered = lower(torch.export.export(to_integer(q, (x,)), (x,)).run_decompositions(), spec)
    counts = {name: c for name, c in kernel_counts(lowered.ir_module, spec).items() if "conv2d_int8_grouped" in name}
    assert len(counts) == 1, list(counts)
    per_mac = next(iter(counts.values()))["instructions"] / (16 * 16 * 64 * 9)
    assert per_mac < 0.65, per_mac


class _DepthwiseNet(nn.Module):
    """Depthwise 3×3 convs as MobileNetV2 writes them, on a 7×9 map: 32 channels (whole 16-channel re-layout
    calls: the zero-point pad fused into the re-layout kernel) at stride 1 and 2, 40 and 24 channels (not
    whole calls: the pad a stage of the conv's kernel) unpadded and padded, in-place ReLU6, a residual
    ``out += x`` around a depthwise block, and a 1-channel depthwise conv (groups = channels = 1)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 1)
        self.dw1 = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw1 = nn.Conv2d(32, 32, 1)
        self.dw2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32)  # 7×9 → 4×5
        self.expand = nn.Conv2d(32, 40, 1)
        self.dw3 = nn.Conv2d(40, 40, 3, groups=40)  # padding 0: 4×5 → 2×3
        self.squeeze = nn.Conv2d(40, 24, 1)
        self.dw4 = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.to_one = nn.Conv2d(24, 1, 1)
        self.dw5 = nn.Conv2d(1, 1, 3, padding=1)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        x = self.act(self.stem(x))
        out = self.pw1(self.act(self.dw1(x)))
        out += x
        out = self.act(self.expand(self.act(self.dw2(out))))
        out = self.squeeze(self.act(self.dw3(out)))
        out = self.to_one(self.act(self.dw4(out)))
        return self.dw5(out)


DEPTHWISE_SHAPE = (1, 3, 7, 9)


@pytest.fixture(scope="module")
def depthwise_net():
    torch.manual_seed(1)
    model = _DepthwiseNet().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(DEPTHWISE_SHAPE, generator=g)
    q = graphopt.quantize(model, (x,), [(torch.randn(4, *DEPTHWISE_SHAPE[1:], generator=g),) for _ in range(3)])
    inputs = [x, 4 * torch.randn(DEPTHWISE_SHAPE, generator=g), torch.full(DEPTHWISE_SHAPE, 1e3),
              torch.full(DEPTHWISE_SHAPE, -1e3)]
    return q, to_integer(q, (x,)), x, inputs


def _assert_depthwise_exact(depthwise_net, target: str, depthwise: int):
    q, ig, x, inputs = depthwise_net
    cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False)
    scheduled = cm.report.lowering["scheduled"]
    assert scheduled.get("depthwise_dot", 0) == depthwise
    assert scheduled.get("depthwise_columns", 0) == (2 if depthwise else 0)  # the 32-channel convs' re-layouts
    for inp in inputs:
        want = ig(inp)
        assert torch.equal(cm(inp), want), f"{target}: max difference {(cm(inp).float() - want.float()).abs().max()}"
        assert np.array_equal(want.numpy(), qref.run(ig, [inp])[0])


@pytest.mark.emulation
def test_depthwise_sdot_is_bit_exact_on_a55(depthwise_net):
    """The lane-wise sdot kernel takes the five 3×3 depthwise convs and matches the integer reference bit for
    bit (inputs saturating at both ends included)."""
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    _assert_depthwise_exact(depthwise_net, "arm-a55", 5)


@pytest.mark.slow
@pytest.mark.parametrize(("target", "depthwise"), [("arm-a76", 5), ("arm-a53", 0)])
def test_depthwise_sdot_only_with_dotprod(depthwise_net, target, depthwise):
    """arm-a76 (dotprod, i8mm) takes the sdot kernel too; arm-a53 (no dotprod) keeps the grouped kernel; both exact."""
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    _assert_depthwise_exact(depthwise_net, target, depthwise)


def test_depthwise_sdot_weight_packing():
    """W′[kx, c, k] = w[k, kx, c] for the 3 vertical taps, 0 for the fourth and for the padding channels: the
    packed constant against the layer's HWIO weights."""
    from tvm import relax

    from graphopt.targets.lowering.int8 import legalize_depthwise_dot

    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (3, 3, 1, 24), dtype=np.int8)
    data = relax.Var("x", relax.TensorType((1, 7, 9, 24), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [data]):
        call = relax.op.nn.conv2d(data, relax.const(w), padding=1, groups=24, data_layout="NHWC",
                                  kernel_layout="HWIO", out_dtype="int32")
        out = legalize_depthwise_dot(bb, bb.normalize(call))  # call_tir(kernel, (data, packed weights))
        bb.emit_func_output(data)
    packed = out.args[1].fields[1].value.numpy()
    assert packed.shape == (3, 32, 4)
    want = np.zeros((3, 32, 4), np.int8)
    for kx in range(3):
        for c in range(24):
            for k in range(3):
                want[kx, c, k] = w[k, kx, 0, c]
    np.testing.assert_array_equal(packed, want)


def test_depthwise_sdot_declines():
    """Channel multiplier 2, 5×5 windows and dilation keep the grouped kernel (None here)."""
    from tvm import relax

    from graphopt.targets.lowering.int8 import legalize_depthwise_dot

    def legalize(c: int, f: int, k: int, dilation: int = 1):
        data = relax.Var("x", relax.TensorType((1, 9, 9, c), "int8"))
        w = np.ones((k, k, 1, f), np.int8) * 3
        bb = relax.BlockBuilder()
        with bb.function("main", [data]):
            call = bb.normalize(relax.op.nn.conv2d(data, relax.const(w), groups=c, dilation=dilation,
                                                   data_layout="NHWC", kernel_layout="HWIO", out_dtype="int32"))
            out = legalize_depthwise_dot(bb, call)
            bb.emit_func_output(data)
        return out

    assert legalize(8, 8, 3) is not None
    assert legalize(8, 16, 3) is None
    assert legalize(8, 8, 5) is None
    assert legalize(8, 8, 3, dilation=2) is None
