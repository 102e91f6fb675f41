"""The NEON (no dotprod) int8 dot kernels of `targets/intrin_neon.py` on emulated Cortex-A53: bit-exact
against the folded integer graph at extreme int8 values, and never given a layer with −128 weights."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from conftest import require_tools
from torch import nn

import graphopt
from graphopt.targets.lowering import int8, intrin_neon
from graphopt.targets.lowering.kernels import dot_kernels
from graphopt.targets.spec import Feature

SHAPE = (1, 16, 4, 4)


class _Net(nn.Module):
    """Every dot layer reduces over ≥ 16 channels: 3×3 conv 16→32, 1×1 conv 32→32, dense 512→16."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 1), nn.Linear(512, 16)
        with torch.no_grad():  # equal magnitudes: every quantized c1 weight is ±127, the int16 worst case
            self.c1.weight.copy_(0.05 * torch.sign(torch.randn_like(self.c1.weight)))

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    signs = torch.sign(torch.randn(SHAPE, generator=g))
    # saturating the input quantizer: all −128, all 127, mixed extremes; then ordinary values
    return [torch.full(SHAPE, -1e3), torch.full(SHAPE, 1e3), 1e3 * signs, torch.randn(SHAPE, generator=g)]


def _quantized(model: nn.Module, scheme: graphopt.QuantScheme | None = None):
    x = _inputs()[-1]
    calib = [(torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    q = graphopt.quantize(model.eval(), (x,), calib, scheme or graphopt.QuantScheme())
    ig = graphopt.to_integer(q, (x,))
    weights = [b for n, b in ig.named_buffers() if n.endswith("_weight_int")]
    return q, ig, x, weights


def _compile_exact(q, ig, x) -> str:
    """Compile for arm-a53, check every input bit-exactly; the kernels' disassembly."""
    cm = graphopt.compile(q, (x,), "arm-a53", progress=False, count_instructions=False)
    assert cm.report.lowering["scheduled"].get("tensorized_dot", 0) >= 2
    for inp in _inputs():
        got, want = cm(inp), ig(inp)
        assert torch.equal(got, want), f"max difference {(got.float() - want.float()).abs().max()}"
    return subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(cm.build_dir / "model.so")],
                          capture_output=True, text=True, check=True).stdout


def test_kernels_are_preferred_on_neon_only_where_weights_fit():
    kernels = dot_kernels(graphopt.get_target("arm-a53"))
    ours = set(intrin_neon.KERNELS)
    assert all(k.feature is Feature.A64 and k.min_weight == -127 for k in ours)
    w = np.full((3, 3, 64, 8), 127, np.int8)
    assert int8.choose(kernels, w, 64) is intrin_neon.KERNELS[0]  # the longest reduction first
    assert int8.choose(kernels, w[:, :, :48], 48).depth == 16
    assert int8.choose(kernels, w[:, :, :24], 24).depth == 24  # not 32, a third of it padding
    assert int8.choose(kernels, w[:, :, :72], 72).depth == 24
    assert int8.choose(kernels, w[:, :, :8], 8).intrin == "dot_4x4_i8i8s32_neon"  # 8 channels: 4×4, no padding
    w[0, 0, 0, 0] = -128
    assert int8.choose(kernels, w, 64).intrin == "dot_4x4_i8i8s32_neon"
    assert not ours & set(dot_kernels(graphopt.get_target("arm-a55"))[:1])  # sdot stays first


@pytest.mark.emulation
def test_quantized_model_on_a53_is_bit_exact_and_uses_the_kernel():
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump")
    torch.manual_seed(0)
    q, ig, x, weights = _quantized(_Net())
    assert min(int(w.min()) for w in weights) == -127 and max(int(w.max()) for w in weights) == 127
    asm = _compile_exact(q, ig, x)
    assert "smlal2" in asm  # only the new kernels accumulate the high halves with smlal2


@pytest.mark.emulation
def test_layer_with_minus_128_weights_keeps_the_4x4_kernel_and_is_exact():
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 1))
    # a clipping weight range (90th percentile of |w|) rounds the most negative weights to −128
    q, ig, x, weights = _quantized(model, graphopt.QuantScheme(weight_observer="percentile", percentile=90))
    assert len(weights) == 2 and all(int(w.min()) == -128 for w in weights)
    asm = _compile_exact(q, ig, x)
    assert "smlal2" not in asm and "smull" in asm


@pytest.mark.emulation
def test_24_channel_reductions_take_the_24_deep_kernel_exactly():
    """A 1×1 conv from 24 channels (MobileNetV2's 24→144 expand) reduces 24 values, not 32: bit-exact with
    every weight ±127 (each int16 lane's two products at the worst case)."""
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 24, 1), nn.ReLU(), nn.Conv2d(24, 40, 1))
    with torch.no_grad():
        model[2].weight.copy_(0.05 * torch.sign(torch.randn_like(model[2].weight)))
    q, ig, x, weights = _quantized(model)
    assert {int(w.min()) for w in weights[1:]} == {-127} and {int(w.max()) for w in weights[1:]} == {127}
    cm = graphopt.compile(q, (x,), "arm-a53", progress=False, count_instructions=False)
    kernels = [r["kernel"] for r in cm.report.lowering["weight_storage"]["layers"]]
    assert kernels == [intrin_neon.intrin_name(16), intrin_neon.intrin_name(24)], kernels
    for inp in _inputs():
        assert torch.equal(cm(inp), ig(inp))
