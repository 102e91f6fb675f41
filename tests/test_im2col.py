"""Few-channel int8 convs as a 1×1 conv over their windows (`targets/lowering/patches.py`, `int8.legalize_conv2d`):
the window copy against numpy, the convs bit-exact against the folded integer graph on the host and emulated
ARM, and the RGB stem's instructions on arm-a53."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import tvm
from conftest import require_tools, saturating_inputs
from torch import nn

import graphopt
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.targets.lowering import patches


def _windows(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, depth: int, groups: int) -> np.ndarray:
    n, h, w, c = x.shape
    oh, ow, g_in = (h - kh) // sh + 1, (w - kw) // sw + 1, c // groups
    out = np.zeros((n, oh, ow, groups * depth), np.int8)
    for b, y, u, g in itertools.product(range(n), range(oh), range(ow), range(groups)):
        window = x[b, y * sh:y * sh + kh, u * sw:u * sw + kw, g * g_in:(g + 1) * g_in]
        out[b, y, u, g * depth:g * depth + kh * kw * g_in] = window.reshape(-1)
    return out


@pytest.mark.parametrize("shape, kh, kw, strides, depth, groups", [
    ((1, 34, 34, 3), 3, 3, (2, 2), 32, 1),  # RGB 3×3 stride 2: two 16-byte row copies, one 9-byte, 5 zero bytes
    ((2, 9, 7, 1), 3, 3, (1, 1), 12, 1),  # 1 channel, batch 2: 3-byte rows
    ((1, 8, 8, 4), 2, 2, (1, 1), 16, 1),  # 8-byte rows, no tail
    ((1, 11, 13, 3), 5, 5, (2, 1), 76, 1),  # 15-byte rows, unequal strides
    ((1, 9, 9, 2), 7, 7, (1, 1), 100, 1),  # 14-byte rows, 7 of them
    ((1, 6, 5, 3), 3, 3, (1, 1), 28, 1),  # 16-byte copies reaching the last input row's neighbour
    ((1, 4, 4, 1), 3, 1, (1, 1), 4, 1),  # 1-byte rows and tail: scalar stores
    ((1, 10, 10, 24), 3, 3, (1, 1), 64, 4),  # mobilenet_blocks' 24→32 groups=4: 6-byte taps, 10 zero bytes
    ((2, 7, 9, 8), 3, 3, (2, 1), 48, 2),  # batch 2, unequal strides, 4-byte taps
    ((1, 6, 6, 32), 3, 3, (1, 1), 48, 8),  # ResNeXt's group width 4
    ((1, 5, 5, 6), 2, 2, (1, 1), 16, 3),  # 2-byte taps: 4-byte copies reaching the next pixel
])
def test_patches_copy_every_window(shape, kh, kw, strides, depth, groups):
    func = patches.patches(shape, kh, kw, strides, depth, groups)
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    x = np.random.default_rng(0).integers(-128, 128, shape).astype(np.int8)
    want = _windows(x, kh, kw, *strides, depth, groups)
    got = tvm.runtime.tensor(np.full(want.shape, 77, np.int8), tvm.cpu())  # stale bytes: the tail must be zeroed
    lib(tvm.runtime.tensor(x, tvm.cpu()), got)
    np.testing.assert_array_equal(got.numpy(), want)


def test_fits_only_unpadded_undilated_multi_row_windows_of_one_vector():
    assert patches.fits(3, 3, 3, [0, 0, 0, 0], [1, 1])
    assert not patches.fits(3, 3, 3, [1, 1, 1, 1], [1, 1])  # padded: the row reduction reads the pad value
    assert not patches.fits(3, 3, 3, [0, 0, 0, 0], [2, 2])
    assert not patches.fits(1, 3, 3, [0, 0, 0, 0], [1, 1])  # one row: already one contiguous reduction
    assert not patches.fits(7, 7, 3, [0, 0, 0, 0], [1, 1])  # ResNet's 7×7 RGB stem: 21-byte rows
    assert patches.fits(3, 3, 24, [0, 0, 0, 0], [1, 1], groups=4)  # 6 channels per group and tap
    assert patches.fits(1, 3, 8, [0, 0, 0, 0], [1, 1], groups=2)  # grouped: a 1×3 window is 3 taps
    assert not patches.fits(3, 3, 64, [0, 0, 0, 0], [1, 1], groups=2)  # 32 channels per group: no copy needed


class Stems(nn.Module):
    """Two RGB stems on one quantized input (its padded channel-last copy, `quantize_channel_last`): 3×3
    stride 2 (27 taps) and stride 1 (its 16-byte row copies reach the next input row) on an odd-sized image,
    then a 7×7 stride-1 stem whose 21-byte rows keep the row reduction."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.same = nn.Conv2d(3, 8, 3, padding=1)
        self.wide = nn.Conv2d(3, 8, 7, padding=1)
        self.pool = nn.AvgPool2d(2, ceil_mode=True)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        down, same = torch.relu(self.down(x)), self.pool(torch.relu(self.same(x)))
        return self.head(torch.cat([down, same], 1)), self.wide(x)


SHAPE = (1, 3, 13, 11)


@pytest.fixture(scope="module")
def quantized():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g)
    q = graphopt.quantize(Stems().eval(), (x,), [(torch.randn(SHAPE, generator=g),) for _ in range(4)])
    return q, to_integer(q, (x,)), x


@pytest.mark.parametrize("target", ["host", pytest.param("arm-a53", marks=pytest.mark.emulation),
                                    pytest.param("arm-a55", marks=pytest.mark.emulation)])
def test_stems_read_copied_windows_exactly(quantized, target):
    """On NEON (`CpuParams.im2col`); the host keeps the row reduction."""
    if target != "host":
        require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    q, integer_graph, x = quantized
    cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False)
    copies = 0 if target == "host" else 2
    assert cm.report.lowering["scheduled"].get("conv_patches", 0) == copies, cm.report.lowering["scheduled"]
    for inp in saturating_inputs(SHAPE):
        for got, want in zip(cm(inp), integer_graph(inp), strict=True):
            assert torch.equal(got, want), f"{target}: max difference {(got - want).abs().max()}"


@pytest.mark.emulation
def test_rgb_stem_instructions_on_arm_a53():
    """mobilenet_blocks' 3×3 stride-2 RGB stem on its 3×32×32 input: 71,447 instructions reducing three 16-value
    rows per output (27 taps), 39,924 + the window copy's 3,168 reducing 32 values."""
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import kernel_counts
    from graphopt.zoo import ZOO

    model, (x,) = ZOO["mobilenet_blocks"].factory()
    q = graphopt.quantize(model, (x,), [(torch.randn(x.shape, generator=torch.Generator().manual_seed(i)),)
                                        for i in range(4)])
    spec = get_target("arm-a53")
    ep = torch.export.export(to_integer(q, (x,)), (x,)).run_decompositions()
    counts = kernel_counts(lower(ep, spec).ir_module, spec)
    stem = [c for name, c in counts.items() if name.startswith("fused_conv2d_int8_add")]
    assert len(stem) == 1 and "conv_patches" in counts, list(counts)  # the stem's copy is the first of two
    copy = counts["conv_patches"]["instructions_per_call"]
    assert copy + stem[0]["instructions_per_call"] < 50_000, (copy, stem)


class Grouped(nn.Module):
    """Grouped 3×3 convs as MobileNet-style and ResNeXt-style blocks write them: 24→32 groups=4 (6 channels per
    group), 32→32 groups=8 stride 2 (ResNeXt's group width 4), and group width 2 (2 outputs per group: no
    4-lane kernel divides them, the grouped kernel keeps it)."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 24, 1)
        self.g4 = nn.Conv2d(24, 32, 3, padding=1, groups=4)
        self.g8 = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=8)
        self.g16 = nn.Conv2d(32, 32, 3, padding=1, groups=16)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        return self.g16(self.act(self.g8(self.act(self.g4(self.act(self.expand(x)))))))


GROUPED_SHAPE = (1, 3, 9, 11)


@pytest.mark.emulation
@pytest.mark.parametrize("target, copies", [("arm-a53", 2), ("arm-a55", 0)])  # arm-a55: sdot reads each group
def test_grouped_convs_read_copied_windows_exactly(target, copies):
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(GROUPED_SHAPE, generator=g)
    q = graphopt.quantize(Grouped().eval(), (x,), [(torch.randn(GROUPED_SHAPE, generator=g),) for _ in range(4)])
    integer_graph = to_integer(q, (x,))
    cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False)
    assert cm.report.lowering["scheduled"].get("conv_patches", 0) == copies, cm.report.lowering["scheduled"]
    assert cm.report.lowering["scheduled"].get("grouped_int8", 0) == 1  # group width 2
    for inp in saturating_inputs(GROUPED_SHAPE):
        assert torch.equal(cm(inp), integer_graph(inp))
