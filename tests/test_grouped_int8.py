"""Grouped and depthwise int8 convs (`int8.legalize_grouped_conv2d` + `schedules.GroupedInt8`): the weight
packing against a float64 oracle, bit-exact outputs against the folded integer graph and `graphopt.qref`
on emulated ARM (int16 pair products, and single products for layers with −128 weights),
and an instruction count showing the kernel path is taken on aarch64. x86 keeps the generic kernel
(it has no int8×int8→int16 widening multiply) and stays exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_tools
from torch import nn

import graphopt
from graphopt import qref
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.targets.lowering.int8 import grouped_channel_tile

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


def _assert_exact(cm, ig, kernels: int = 7):
    # NEON: every grouped and depthwise conv but the last, which on a 1×1 map sees data at its centre
    # tap only and lowers as a per-channel scale fused with its neighbours; x86: the generic kernel
    assert cm.report.lowering["scheduled"].get("grouped_int8", 0) == kernels
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
    _assert_exact(graphopt.compile(q, (x,), "arm-a55", progress=False, count_instructions=False), ig)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["arm-a53", "arm-a76", "armv7"])
def test_other_arm_targets_are_bit_exact(quantized, target):
    require_tools(*(("arm-linux-gnueabihf-gcc", "qemu-arm") if target == "armv7"
                    else ("aarch64-linux-gnu-gcc", "qemu-aarch64")))
    q, ig, x = quantized
    _assert_exact(graphopt.compile(q, (x,), target, progress=False, count_instructions=False), ig)


class _Depthwise(nn.Module):
    """MobileNetV2's 64-channel depthwise 3×3 at 16×16 (inside the zoo's mobilenet_blocks)."""

    def __init__(self):
        super().__init__()
        self.pw, self.dw = nn.Conv2d(16, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv2d(64, 16, 1)

    def forward(self, x):
        return self.project(nn.functional.relu6(self.dw(torch.relu(self.pw(x)))))


@pytest.mark.emulation
def test_depthwise_kernel_instructions_per_mac_on_a53():
    """The depthwise layer, requantize epilogue included: 0.61 instructions per MAC measured on the grouped
    kernel (90,146 per call), 0.71 on the generic int32 kernel it replaced (103,998)."""
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import kernel_counts

    torch.manual_seed(0)
    x = torch.randn(1, 16, 16, 16)
    q = graphopt.quantize(_Depthwise().eval(), (x,), [(torch.randn(4, 16, 16, 16),)])
    spec = get_target("arm-a53")
    lowered = lower(torch.export.export(to_integer(q, (x,)), (x,)).run_decompositions(), spec)
    counts = {name: c for name, c in kernel_counts(lowered.ir_module, spec).items() if "conv2d_int8_grouped" in name}
    assert len(counts) == 1, list(counts)
    per_mac = next(iter(counts.values()))["instructions"] / (16 * 16 * 64 * 9)
    assert per_mac < 0.65, per_mac
