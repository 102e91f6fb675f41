"""Memory-aware Cortex-M builds (issue 16): weight storage chosen per layer by ``optimize_for`` and the
board's flash, kernels shared between layers of equal shape, the arena at its peak-live bound, and
per-layer flash / RAM / instructions in the report — against Arm CMSIS-NN's figures for the zoo's
residual_cnn (measured for issue 16: same layers and quantization, outputs bit-identical).

Every build is checked bit for bit against graphopt's integer reference under QEMU. QEMU tests are
marked `emulation`; missing tools skip outside CI and fail in CI.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from conftest import require_tools
from torch import nn

import graphopt
from graphopt import qref, zoo
from graphopt.config import OptimizeFor
from graphopt.targets import get_target
from graphopt.targets.lowering.int8 import WeightStorage, choose, layer_key, weight_storage
from graphopt.targets.lowering.intrin_cortex_m import DSP16_KERNEL, DSP_KERNEL, MAX_WEIGHTS_16
from graphopt.targets.lowering.kernels import dot_kernels

M4 = get_target("cortex-m4")
BARE = ("arm-none-eabi-gcc", "qemu-system-arm")
# CMSIS-NN (TFLite Micro's kernels, gcc -O2, called directly) on cortex-m4, residual_cnn int8 (issue 16):
# flash = kernels + weights + glue, RAM = arena + scratch; instructions = graphopt's default build of that
# day (19,049,525) / 0.64, the measured ratio
CMSIS_NN = {"flash_bytes": 97_744, "ram_bytes": 51_456, "instructions": 19_049_525 / 0.64}
# before issue 16 (the same measurement): graphopt's default residual_cnn int8 build
DEFAULT_BEFORE = {"flash_bytes": 152_682, "ram_bytes": 58_176, "instructions": 19_049_525}
X = torch.randn(1, 3, 14, 14, generator=torch.Generator().manual_seed(1))


class Net(nn.Module):
    """Four layers with dot kernels: a 3-channel stem, a strided conv, a 1x1 with a residual add, a dense."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.down = nn.Conv2d(32, 48, 3, stride=2, padding=1)
        self.pw = nn.Conv2d(48, 48, 1)
        self.fc = nn.Linear(48 * 7 * 7, 10)

    def forward(self, x):
        y = torch.relu(self.down(torch.relu(self.stem(x))))
        return self.fc(torch.relu(self.pw(y) + y).flatten(1))


def _quantized(model: nn.Module, x: torch.Tensor, n: int = 4):
    torch.manual_seed(0)
    calibration = [(torch.randn(x.shape, generator=torch.Generator().manual_seed(i)),) for i in range(n)]
    return graphopt.quantize(model.eval(), (x,), calibration)


def _storages(cm) -> list[str]:
    return [r["storage"] for r in cm.report.lowering["weight_storage"]["layers"]]


def _exact(cm, q, x) -> None:
    want = qref.run(graphopt.to_integer(q, (x,)), (x,))[0]
    got = cm(x).numpy()
    assert np.array_equal(got, want), f"max difference {np.abs(got - want).max()}"


# --------------------------------------------------------------------------- no QEMU

def test_choose_follows_the_weight_storage_policy():
    kernels = dot_kernels(M4)
    small, big = np.ones((3, 3, 16, 16), np.int8), np.ones((3, 3, 64, 64), np.int8)
    assert small.size <= MAX_WEIGHTS_16 < big.size
    expected = {OptimizeFor.BALANCED: (DSP16_KERNEL, DSP_KERNEL), OptimizeFor.SPEED: (DSP16_KERNEL, DSP16_KERNEL),
                OptimizeFor.SIZE: (DSP_KERNEL, DSP_KERNEL)}
    for mode, (for_small, for_big) in expected.items():
        with weight_storage(WeightStorage(mode)):
            assert (choose(kernels, small, 16), choose(kernels, big, 64)) == (for_small, for_big), mode
    assert choose(kernels, small, 16) is DSP16_KERNEL  # outside: the default policy
    with weight_storage(WeightStorage(OptimizeFor.SPEED, narrow=frozenset({layer_key(small)}))):
        assert choose(kernels, small, 16) is DSP_KERNEL and choose(kernels, big, 64) is DSP16_KERNEL


def test_optimize_for_reaches_the_command_line():
    from graphopt.cli import build_parser

    args = build_parser().parse_args(["compile", "m.py:f", "--out", "o", "--optimize-for", "size"])
    assert args.optimize_for is OptimizeFor.SIZE
    assert build_parser().parse_args(["compile", "m.py:f", "--out", "o"]).optimize_for is OptimizeFor.BALANCED


# --------------------------------------------------------------------------- under QEMU

@pytest.mark.emulation
@pytest.mark.parametrize("mode", list(OptimizeFor))
def test_every_storage_mode_is_bit_exact(mode):
    require_tools(*BARE)
    q = _quantized(Net(), X)
    cm = graphopt.compile(q, (X,), M4, optimize_for=mode.value, progress=False, count_instructions=False)
    _exact(cm, q, X)
    assert cm.report.lowering["optimize_for"] == mode.value
    assert _storages(cm) == (["int8"] * 4 if mode is OptimizeFor.SIZE else ["int16"] * 4)  # all <= 32768 weights
    rows = [r for r in cm.report.lowering["layers"] if "weight_storage" in r]
    assert [r["weight_storage"] for r in rows] == _storages(cm) and all(r["storage_reason"] for r in rows)


class _Fp32Blocks(nn.Module):
    """fp32 convs as people write them: in-place ReLU, a nested block, ``out += x``, odd channel counts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(inplace=True))
        self.block = nn.Sequential(nn.Conv2d(12, 20, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(20, 12, 1))

    def forward(self, x):
        out = self.stem(x)
        out += self.block(out)
        return out


@pytest.mark.emulation
def test_fp32_tiles_use_the_fpu_registers_except_when_optimizing_for_size():
    """fp32 accumulators of the generic conv kernel live in the FPU's 32 single registers (`CpuParams.float_regs`):
    the default build runs fewer instructions; a size build keeps the smaller tiles and less code. Outputs are
    bit-identical (tiling pixels does not reorder any sum) and match eager."""
    require_tools(*BARE)
    torch.manual_seed(0)
    model, x = _Fp32Blocks().eval(), torch.randn(1, 3, 16, 16)
    fast, small = (graphopt.compile(model, (x,), M4, optimize_for=mode, progress=False, count_instructions=True,
                                    cache=False) for mode in ("balanced", "size"))
    for inp in (x, torch.randn(1, 3, 16, 16) * 10):
        with torch.no_grad():
            want = model(inp.clone())
        assert torch.equal(fast(inp), small(inp))
        torch.testing.assert_close(fast(inp), want, rtol=1e-4, atol=1e-4)
    # instruction counts on bare metal are exact (a proxy, not a time)
    assert fast.report.instructions_per_inference < 0.95 * small.report.instructions_per_inference
    assert fast.report.lowering["flash"]["kernels"] > small.report.lowering["flash"]["kernels"]


@pytest.mark.emulation
def test_layers_keep_int8_weights_where_the_board_flash_is_short():
    require_tools(*BARE)
    q = _quantized(Net(), X)
    roomy = graphopt.compile(q, (X,), M4, progress=False, count_instructions=False)
    need = roomy.report.lowering["flash_bytes"]
    tight = dataclasses.replace(M4, name="cortex-m4-tight", aliases=(), flash_bytes=need - 1)
    cm = graphopt.compile(q, (X,), tight, progress=False, count_instructions=False)
    low = cm.report.lowering
    assert low["flash_bytes"] <= need - 1 and low["weight_storage"]["int8_to_fit_the_board"]
    reasons = [r["reason"] for r in low["weight_storage"]["layers"] if r["storage"] == "int8"]
    assert reasons and all("board's flash" in r for r in reasons)
    assert "int16" in _storages(cm)  # only what the board needs is demoted: the dense (fewest MACs per byte)
    _exact(cm, q, X)


@pytest.fixture(scope="module")
def residual_cnn():
    model, inputs = zoo.residual_cnn()
    return _quantized(model, inputs[0], n=16), inputs[0]


def _layer_instructions_add_up(cm) -> None:
    rows = cm.report.lowering["layers"]
    per_call = [r["instructions"] for r in rows]
    assert all(n > 0 for n in per_call)
    # count(1 inference) - count(0) also holds the harness's output writes and its stack-paint scan (shorter
    # after an inference): a few thousand instructions either way; the calls hold all the rest
    assert abs(cm.report.instructions_per_inference - sum(per_call)) < 5000


@pytest.mark.emulation
def test_residual_cnn_size_build_meets_cmsis_nn_flash_and_ram_and_stays_faster(residual_cnn):
    require_tools(*BARE)
    q, x = residual_cnn
    cm = graphopt.compile(q, (x,), M4, optimize_for="size", progress=False)
    low = cm.report.lowering
    assert low["flash_bytes"] <= 1.05 * CMSIS_NN["flash_bytes"], low["flash"]
    # the arena holds kernel scratch too; its bound is block 1's shortcut + padded input + output
    assert low["ram"]["arena"] == low["arena"]["lower_bound"] == 16384 + 18496 + 16384 <= CMSIS_NN["ram_bytes"]
    assert cm.report.instructions_per_inference <= 0.8 * CMSIS_NN["instructions"]
    assert set(_storages(cm)) == {"int8"}
    shared = [r for r in low["layers"] if r["calls_sharing_kernel"] == 2 and r.get("weight_storage")]
    assert len(shared) == 2 and shared[0]["kernel"] == shared[1]["kernel"]  # block 1's two convs: one kernel
    _layer_instructions_add_up(cm)
    assert re.search(r"\| 4 \| conv2d 3x3 16->16 \| [\d.]+M \|", cm.report.to_markdown())
    _exact(cm, q, x)


@pytest.mark.emulation
@pytest.mark.slow
def test_residual_cnn_default_build_is_no_worse_than_before_and_size_mode_costs_at_most_a_quarter(residual_cnn):
    require_tools(*BARE)
    q, x = residual_cnn
    default = graphopt.compile(q, (x,), M4, progress=False)
    size = graphopt.compile(q, (x,), M4, optimize_for="size", progress=False)
    low = default.report.lowering
    assert low["flash_bytes"] <= DEFAULT_BEFORE["flash_bytes"]
    assert low["ram"]["arena"] <= DEFAULT_BEFORE["ram_bytes"]
    assert default.report.instructions_per_inference <= DEFAULT_BEFORE["instructions"]
    # at most a quarter above the default build, then and now
    assert size.report.instructions_per_inference <= 1.25 * default.report.instructions_per_inference
    assert size.report.lowering["flash_bytes"] < low["flash_bytes"]
    _exact(default, q, x)
