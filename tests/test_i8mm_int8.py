"""The 2-pixel ``smmla`` int8 kernel of `targets/intrin_i8mm.py` on emulated i8mm (QEMU ``max``): its packing
and 2×2 block layout against a float64 oracle, where it is chosen, and bit-exact outputs against the
folded integer graph for odd pixel counts (a tail pixel), odd channels, stride 2, padding, and dense
layers with one row (which keep ``sdot``) and an odd number of rows."""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
import torch
from conftest import require_tools, saturating_inputs
from torch import nn

import graphopt
from graphopt.targets.lowering import int8, intrin_dotprod, intrin_i8mm, kernels
from graphopt.targets.lowering.int8 import _pack_conv_weight, _pack_dense_weight

SHAPE = (1, 16, 7, 9)  # 9 columns: 3×3 convs have 9 output pixels per row, 4 pairs and a tail pixel


class _Net(nn.Module):
    """3×3 conv 16→143 (padding 1, odd width; 143 outputs: 72 channel pairs, the last padded), 1×1 conv
    143→48 (odd pixel count 7·9; 143 channels pad to 144), 3×3 stride-2 conv 48→32 (4×5 outputs: a tail
    pixel per row), a dense 160→17 over 3 rows (odd rows and outputs), and a batch-1 linear (one row: sdot)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(16, 143, 3, padding=1), nn.Conv2d(143, 48, 1)
        self.c3 = nn.Conv2d(48, 32, 3, stride=2, padding=1)
        self.rows, self.fc = nn.Linear(160, 17), nn.Linear(4 * 17, 10)
        with torch.no_grad():  # equal magnitudes: every quantized c1 weight is ±127 (or −128)
            self.c1.weight.copy_(0.05 * torch.sign(torch.randn_like(self.c1.weight)))

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        y = torch.relu(self.c3(y))  # [1, 32, 4, 5]
        y = torch.relu(self.rows(y.permute(0, 2, 3, 1).reshape(4, 160)[1:]))  # 3 rows of a dense
        return self.fc(torch.cat([y, y[:1]]).flatten().unsqueeze(0))


def test_packing_and_blocks_reproduce_the_convolution():
    """Σ over the intrinsic's operands — A[p, k] (2 pixels), B[k/8, i, k%8] (chunk-major channel pairs) —
    into the 2×2 block C[p, i] equals the HWIO conv at both pixels of a pair, and the dense packing's pairs."""
    k = intrin_i8mm.KERNEL
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (3, 3, 20, 5)).astype(np.int8)  # C, F not multiples of 16, 2
    x = rng.integers(-128, 128, (5, 6, 20)).astype(np.float64)
    packed = _pack_conv_weight(w, k).astype(np.float64)
    assert packed.shape == (3, 3, 3, 2, 2, 2, 8)  # [F/2, KH, KW, C/16, 16/8, 2, 8]
    xp = np.pad(x, [(0, 0), (0, 0), (0, 12)])
    for y, pair, ft in [(0, 0, 0), (2, 1, 2), (1, 1, 1)]:
        block = np.zeros((2, 2))
        for i in range(3):
            for j in range(3):
                for c0 in range(0, 32, 16):
                    a = xp[y + i, 2 * pair + j:2 * pair + j + 2, c0:c0 + 16]  # the two pixels' rows
                    b = packed[ft, i, j, c0 // 16]
                    for p, ii, kk in np.ndindex(2, 2, 16):
                        block[p, ii] += a[p, kk] * b[kk // 8, ii, kk % 8]
        for p, ii in np.ndindex(2, 2):
            f = 2 * ft + ii
            want = sum(x[y + i, 2 * pair + p + j, c] * (w[i, j, c, f] if f < 5 else 0)
                       for i in range(3) for j in range(3) for c in range(20))
            assert block[p, ii] == want
    dense = rng.integers(-128, 128, (20, 3)).astype(np.int8)  # [K, N]
    pd = _pack_dense_weight(dense, k)
    assert pd.shape == (2, 2, 2, 2, 8)
    assert np.array_equal(pd[0, 0, 1, 1, :], dense[8:16, 1]) and not pd[1, :, :, 1].any()  # padding output 3


def test_chosen_on_i8mm_for_several_pixels_only():
    a76, a55 = graphopt.get_target("arm-a76"), graphopt.get_target("arm-a55")
    on_a76 = kernels.dot_kernels(a76)
    assert on_a76[0] is intrin_i8mm.KERNEL and intrin_i8mm.KERNEL not in kernels.dot_kernels(a55)
    w = np.full((3, 3, 64, 8), -128, np.int8)
    assert int8.choose(on_a76, w, 64, 3, pixels=9) is intrin_i8mm.KERNEL
    assert int8.choose(on_a76, w, 64, 3, pixels=1) is intrin_dotprod.KERNEL  # a pair would be half padding
    assert int8.choose(on_a76, w[:, :, :8], 8, 3, pixels=9) is intrin_dotprod.KERNEL  # flat rows: 32 values vs 24
    assert int8.choose(on_a76, w[:1, :1, :8], 8, 1, pixels=9).intrin == "sdot_4x4_i8i8s32"  # 16 would pad 2×
    # RGB stem, flat rows: 16 values against the 4×4 sdot's 12 are within int8.PAD_TOLERANCE (mobilenet_blocks'
    # stem on arm-a55: 33k instructions with the 4×16 kernel, 61k with the 4×4)
    assert int8.choose(on_a76, w[:, :, :3], 3, 3, pixels=32) is intrin_dotprod.KERNEL
    w1 = np.ones((1, 1, 96, 8), np.int8)  # a 1×1 conv reducing 96 values: smmla's epilogue costs more than it saves
    assert int8.choose(on_a76, w1, 96, pixels=9) is intrin_dotprod.KERNEL
    assert int8.choose(on_a76, np.ones((1, 1, 128, 8), np.int8), 128, pixels=9) is intrin_i8mm.KERNEL
    assert int8.choose(on_a76, w1[0, 0], 96, pixels=2) is intrin_dotprod.KERNEL  # dense [K, N] likewise


def _disassembly(cm) -> str:
    return subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(cm.build_dir / "model.so")],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.emulation
def test_quantized_model_is_bit_exact_with_smmla_on_a76_only():
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump")
    torch.manual_seed(0)
    x = saturating_inputs(SHAPE)[3]
    calib = [(torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    q = graphopt.quantize(_Net().eval(), (x,), calib)
    ig = graphopt.to_integer(q, (x,))
    weights = [b for n, b in ig.named_buffers() if n.endswith("_weight_int")]
    assert min(int(w.min()) for w in weights) <= -127 and max(int(w.max()) for w in weights) == 127
    asm = {}
    for target in ("arm-a76", "arm-a55"):
        cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False)
        assert cm.report.lowering["scheduled"].get("tensorized_dot", 0) == 5
        kernels = [r["kernel"] for r in cm.report.lowering["weight_storage"]["layers"]]
        smmla = [kn == intrin_i8mm.NAME for kn in kernels]
        assert smmla == ([True] * 4 + [False] if target == "arm-a76" else [False] * 5), kernels
        for inp in saturating_inputs(SHAPE):
            got, want = cm(inp), ig(inp)
            assert torch.equal(got, want), f"{target}: max difference {(got.float() - want.float()).abs().max()}"
        asm[target] = _disassembly(cm)
    # 3 convs and the 3-row dense take smmla (2 per 16 channels); the batch-1 linear keeps sdot
    assert len(re.findall(r"\bsmmla\s+v\d+\.4s, v\d+\.16b, v\d+\.16b", asm["arm-a76"])) >= 8
    assert re.search(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.", asm["arm-a76"])
    assert "smmla" not in asm["arm-a55"]
