"""Winograd F(4, 3) and F(2, 3) for fp32 3×3 stride-1 convs on the host (`graphopt.targets.lowering.winograd`).

Oracle: the PyTorch module evaluated in float64 on several random inputs. Bound: max |error| ≤
`REL_BOUND` · max |reference|. F(4, 3) in fp32 rounds ~3.5× more than a direct conv (its transforms
scale by up to 2.25 and cancel; Barabasz et al., arXiv:1803.10986: 3.3e-7 vs 7.7e-8 per layer); here
it measures 1.2e-6 to 2e-6 at 32–64 input channels against ~4e-7 for the direct conv, so 1e-5 leaves
room for the channel counts tested while a wrong transform coefficient or a misplaced tile (errors of
order 1e-1) fails. F(2, 3) rounds less than F(4, 3).
"""
import copy
import dataclasses

import numpy as np
import pytest
import torch

import graphopt
from graphopt.targets import get_target
from graphopt.targets.lowering.winograd import choose_tile, matrices

REL_BOUND = 1e-5


@pytest.mark.parametrize("m", [2, 4])
def test_transform_matrices_reproduce_a_3x3_correlation_in_float64(m):
    """Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A on an α×α tile is the m×m valid correlation of d with g."""
    a, b, g = matrices(m)
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, w = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
        direct = np.array([[np.sum(d[y:y + 3, x:x + 3] * w) for x in range(m)] for y in range(m)])
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
    # 4 tiles of F(4, 3), 16 of F(2, 3); odd sizes on F(2, 3)'s 2×2 tiles
    "8x8_f2": (lambda: ConvReLU(64, 64, 1), (1, 64, 8, 8), ["conv3x3 8x8x64->64 F(2,3)"]),
    "10x13_f2_padding_0": (lambda: ConvReLU(40, 24, 0), (1, 40, 10, 13), ["conv3x3 10x13x40->24 F(2,3)"]),
    "residual_inplace_f2": (lambda: Residual(64), (1, 64, 8, 8), ["conv3x3 8x8x64->64 F(2,3)"] * 2),
    # declined by `choose_tile` (few channels / pixels / tiles): the direct conv, same oracle
    "3_channels": (lambda: ConvReLU(3, 24, 1), (1, 3, 16, 16), []),
    "1x1_map_padding_1": (lambda: ConvReLU(32, 32, 1), (1, 32, 1, 1), []),
    "24_channels_5x5": (lambda: ConvReLU(24, 24, 1), (1, 24, 5, 5), []),
    "7x7_under_64_pixels": (lambda: ConvReLU(64, 64, 1), (1, 64, 7, 7), []),
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


L2 = 1 << 20  # this host's L2 per core


def test_rule_takes_the_tile_measured_to_win():
    def tile(hw, c, batch=1, l2=L2):
        return choose_tile(batch, hw, hw, c, c, l2)

    # ResNet-20's 32²×16 and 16²×32 (F(4, 3) weights in L2), ResNet-18's 56²×64 and 28²×128 (enough tiles)
    assert [tile(hw, c) for hw, c in ((32, 16), (16, 32), (56, 64), (28, 128))] == [4] * 4
    assert tile(8, 64) == 2  # 4 tiles of F(4, 3), 16 of F(2, 3)
    assert tile(8, 64, batch=4) == 4  # … unless a batch brings the tiles
    assert tile(14, 256) == 2  # F(4, 3)'s 9.4 MB streamed past L2 for 16 tiles: F(2, 3)'s 4.2 MB for 49
    assert tile(14, 256, l2=None) == 4  # an unknown L2: as if it fit
    assert tile(7, 512) is None and tile(32, 8) is None  # few pixels; few channels


def test_streamed_weights_take_f2_on_a_small_l2():
    """The same conv takes F(4, 3) or F(2, 3) by whether its transformed weights fit the target's L2;
    both match float64."""
    model = _randomized(ConvReLU(32, 32, 1))
    shape = (1, 32, 13, 13)  # 16 tiles of F(4, 3): 147 KB of weights, 49 of F(2, 3): 65 KB
    host = get_target("host")
    for l2, expected in ((1 << 20, "F(4,3)"), (100 << 10, "F(2,3)")):
        spec = dataclasses.replace(host, name=f"host-l2-{l2}", l2_bytes=l2)
        cm = graphopt.compile(model, (torch.randn(shape),), spec, progress=False)
        assert cm.report.lowering["winograd"] == [f"conv3x3 13x13x32->32 {expected}"]
        assert _max_relative_error(cm, model, shape) <= REL_BOUND


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
