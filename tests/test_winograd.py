"""Winograd F(4, 3) for fp32 3×3 stride-1 convs on the host (`graphopt.targets.lowering.winograd`).

Oracle: the PyTorch module evaluated in float64 on several random inputs. Bound: max |error| ≤
`REL_BOUND` · max |reference|. F(4, 3) in fp32 rounds ~3.5× more than a direct conv (its transforms
scale by up to 2.25 and cancel; Barabasz et al., arXiv:1803.10986: 3.3e-7 vs 7.7e-8 per layer); here
it measures 1.2e-6 to 2e-6 at 32–64 input channels against ~4e-7 for the direct conv, so 1e-5 leaves
room for the channel counts tested while a wrong transform coefficient or a misplaced tile (errors of
order 1e-1) fails.
"""
import copy

import numpy as np
import pytest
import torch

import graphopt
from graphopt.targets.lowering.winograd import matrices, worthwhile

REL_BOUND = 1e-5


def test_transform_matrices_reproduce_a_3x3_correlation_in_float64():
    """Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A on a 6×6 tile is the 4×4 valid correlation of d with g."""
    a, b, g = matrices(4)
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, w = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
        direct = np.array([[np.sum(d[y:y + 3, x:x + 3] * w) for x in range(4)] for y in range(4)])
        np.testing.assert_allclose(a.T @ ((g @ w @ g.T) * (b.T @ d @ b)) @ a, direct, rtol=0, atol=1e-12)


class ConvReLU(torch.nn.Module):
    def __init__(self, c, f, padding):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, f, 3, padding=padding)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv(x))


class Residual(torch.nn.Module):
    """A ResNet basic block's second half as people write it: ``out += x`` and an in-place ReLU."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        out = self.relu(self.bn(self.conv1(x)))
        out = self.conv2(out)
        out += x
        return self.relu(out)


def _randomized(model):
    if hasattr(model, "bn"):
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _max_relative_error(cm, model, shape) -> float:
    worst = 0.0
    reference = copy.deepcopy(model).double()
    for seed in range(3):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = reference(x.double()).numpy()
        out = cm(x).numpy()
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    return worst


# (model, input shape, convs expected to take Winograd)
CASES = {
    "16x16_bias_relu": (lambda: ConvReLU(32, 32, 1), (1, 32, 16, 16), ["conv3x3 16x16x32->32 F(4,3)"]),
    "13x15_not_a_tile_multiple": (lambda: ConvReLU(40, 24, 1), (1, 40, 13, 15), ["conv3x3 13x15x40->24 F(4,3)"]),
    "18x19_padding_0": (lambda: ConvReLU(33, 20, 0), (1, 33, 18, 19), ["conv3x3 18x19x33->20 F(4,3)"]),
    "residual_inplace": (lambda: Residual(32), (1, 32, 16, 16), ["conv3x3 16x16x32->32 F(4,3)"] * 2),
    "batch_2": (lambda: ConvReLU(16, 24, 1), (2, 16, 9, 13), ["conv3x3 9x13x16->24 F(4,3)"]),
    # declined by `worthwhile` (few channels / pixels / tiles): the direct conv, same oracle
    "3_channels": (lambda: ConvReLU(3, 24, 1), (1, 3, 16, 16), []),
    "1x1_map_padding_1": (lambda: ConvReLU(32, 32, 1), (1, 32, 1, 1), []),
    "24_channels_5x5": (lambda: ConvReLU(24, 24, 1), (1, 24, 5, 5), []),
    "8x8_4_tiles": (lambda: ConvReLU(64, 64, 1), (1, 64, 8, 8), []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_host_convs_match_float64_and_take_winograd_where_it_wins(case):
    make, shape, expected = CASES[case]
    torch.manual_seed(1)
    model = _randomized(make())
    cm = graphopt.compile(model, (torch.randn(shape),), "host", progress=False)
    lowering = cm.report.lowering
    assert lowering.get("winograd", []) == expected
    if expected:  # the input and output transforms (kernels shared between equal shapes) took their own
        assert lowering["scheduled"].get("winograd_transform", 0) >= 2  # rule, and no kernel the fallback
        assert "fallback" not in lowering["scheduled"] and not lowering["unscheduled"]
    assert _max_relative_error(cm, model, shape) <= REL_BOUND


def test_rule_declines_the_layers_measured_to_lose():
    # ResNet-20's 32²×16 and 16²×32, ResNet-18's 56²×64 … 14²×256 take it
    assert all(worthwhile(1, hw, hw, c) for hw, c in ((32, 16), (16, 32), (56, 64), (28, 128), (14, 256)))
    assert not worthwhile(1, 7, 7, 512) and not worthwhile(1, 8, 8, 64)  # 4 tiles re-reading 4x the weights
    assert worthwhile(4, 8, 8, 64)  # … unless a batch brings the tiles
    assert not worthwhile(1, 32, 32, 8)  # few channels


def test_arm_targets_keep_the_direct_conv():
    """issue 16 measures ARM against today's fp32 baseline: no Winograd there."""
    model = _randomized(ConvReLU(32, 32, 1))
    cm = graphopt.compile(model, (torch.randn(1, 32, 16, 16),), "arm-a53", progress=False, count_instructions=False)
    assert "winograd" not in cm.report.lowering
    assert cm.report.target["winograd"] is False  # the target's switch


def test_tuning_a_model_with_winograd_convs(tmp_path):
    """The Winograd stages are tuning tasks like any kernel; a database from them compiles to the same
    numbers (each tuned kernel kept only where it beat the default schedule)."""
    model = _randomized(ConvReLU(16, 16, 1))
    args = (torch.randn(1, 16, 16, 16),)
    summary = graphopt.tune(model, args, "host", trials=6, database=tmp_path / "db", progress=False)
    names = {t.name for t in summary.tasks}  # the three stages are tasks (beside the NCHW/NHWC transposes)
    assert {"winograd_input_transform", "winograd_gemm", "fused_winograd_output_transform_add_relu"} <= names
    assert summary.new_trials > 0
    cm = graphopt.compile(model, args, "host", database=tmp_path / "db", progress=False)
    assert cm.report.lowering["winograd"] == ["conv3x3 16x16x16->16 F(4,3)"]
    assert _max_relative_error(cm, model, args[0].shape) <= REL_BOUND
