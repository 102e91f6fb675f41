"""A quantized model's fp32 NCHW input quantized straight into the padded channel-last int8 tensor its first
conv reads (`converters.quantize_channel_last`): bit-exact against the folded integer graph and `graphopt.qref`
— round half to even at exact ties, saturation at both ends — on the host and emulated ARM, for widths that are
not a multiple of the kernel's 8-pixel vectors, 1, 3 and 4 channels, batch 2, padding 0 and 1, stride 2."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_tools
from torch import nn

import graphopt
from graphopt import qref
from graphopt.quantization import to_integer

CASES = [  # (input shape, stem conv)
    ((1, 3, 9, 19), dict(kernel_size=3, padding=1, stride=2)),  # 2 vectors + 3 pixels per row, RGB, pad 1
    ((2, 1, 8, 8), dict(kernel_size=3, padding=0)),  # grayscale, batch 2, no pad
    ((1, 4, 5, 7), dict(kernel_size=1)),  # 4 channels, no whole vector
]


class Stem(nn.Module):
    def __init__(self, channels: int, conv: dict):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, **conv)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def _case(shape, conv):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    q = graphopt.quantize(Stem(shape[1], conv).eval(), (x,), [(torch.randn(shape, generator=g),) for _ in range(3)])
    ig = to_integer(q, (x,))
    scale = float(next(n for n in ig.graph.nodes if "quantize_per_tensor" in str(n.target)).args[1])
    inv = np.float32(1.0 / scale)  # the kernel's x · inv_scale, in float32
    halves = np.arange(-300, 300, dtype=np.float32) + np.float32(0.5)
    exact = [np.float32(h / inv) for h in halves if np.float32(np.float32(h / inv) * inv) == h]
    assert len(exact) > 100  # exactly halfway between two levels: round half to even decides
    ties = torch.tensor(np.resize(np.array(exact, np.float32), shape))
    beyond = torch.tensor(np.resize(np.array([3e9, -3e9, 1e30, -1e30, 3e38, -3e38, np.inf, -np.inf], np.float32),
                                    shape))  # x·inv past ±2^30 (the clip `quantized` leaves out with nearbyint)
    inputs = [x, ties, 5 * torch.randn(shape, generator=g), torch.full(shape, 1e4), torch.full(shape, -1e4), beyond]
    return q, ig, x, inputs


def _assert_exact(target: str):
    for shape, conv in CASES:
        q, ig, x, inputs = _case(shape, conv)
        cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False)
        assert cm.report.lowering["scheduled"].get("quantize_nhwc", 0) == 1, cm.report.lowering["scheduled"]
        for inp in inputs:
            want = ig(inp)
            assert torch.equal(cm(inp), want), f"{target} {shape}: {(cm(inp) - want).abs().max()}"
            assert np.array_equal(want.numpy(), qref.run(ig, [inp])[0])


def test_host_is_bit_exact():
    _assert_exact("host")


@pytest.mark.emulation
def test_arm_a55_is_bit_exact():
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    _assert_exact("arm-a55")


@pytest.mark.slow
def test_armv7_is_bit_exact():
    """ARMv7 NEON has no round-to-integral instruction: `converters.quantized` clamps and adds ±1.5·2^23."""
    require_tools("arm-linux-gnueabihf-gcc", "qemu-arm")
    _assert_exact("armv7")


@pytest.mark.emulation
def test_arm_a55_quantize_nhwc_instructions():
    """A 3×32×32 input into its padded 34×34×3 int8 tensor: 10,028 instructions on arm-a55 with the ±2^30 clip
    before `nearbyint`, 8,156 without (`converters.quantized`)."""
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    from graphopt.targets import get_target
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import kernel_counts

    _, ig, x, _ = _case((1, 3, 32, 32), dict(kernel_size=3, padding=1, stride=2))
    spec = get_target("arm-a55")
    counts = kernel_counts(lower(torch.export.export(ig, (x,)).run_decompositions(), spec).ir_module, spec)
    quantize = [c for name, c in counts.items() if name.startswith("quantize_nhwc")]
    assert len(quantize) == 1, list(counts)
    assert quantize[0]["instructions_per_call"] < 9000, quantize[0]
