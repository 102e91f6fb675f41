"""The indexed-``sdot`` int8 kernel of `targets/intrin_dotprod.py` on emulated Cortex-A55: chunked weight
packing against a float64 oracle, kernel choice, and bit-exact outputs against the folded integer graph
at extreme int8 values (−128 weights included: sdot has no int16 intermediate)."""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
import torch
from conftest import require_tools, saturating_inputs
from torch import nn

import graphopt
from graphopt.targets.lowering import int8, intrin_dotprod
from graphopt.targets.lowering.int8 import _pack_conv_weight, _pack_dense_weight
from graphopt.targets.lowering.kernels import dot_kernels

SHAPE = (1, 16, 6, 6)


class _Net(nn.Module):
    """Dot layers reducing over ≥ 16 channels (3×3 conv 16→32, 1×1 conv 32→48, dense 1728→16) and a
    24-channel one (3×3 conv 48→24 reduces 48 = 3·16; its 24 outputs are 6 lanes-4 vectors)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 48, 1)
        self.c3, self.fc = nn.Conv2d(48, 24, 3, padding=1), nn.Linear(24 * 36, 16)
        with torch.no_grad():  # equal magnitudes: every quantized c1 weight is ±127 (or −128)
            self.c1.weight.copy_(0.05 * torch.sign(torch.randn_like(self.c1.weight)))

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c3(y)).flatten(1))


def test_chunked_packing_reproduces_the_convolution_and_dense():
    """Σ over [F/L, KH, KW, C/D, D/4, L, 4] (the intrinsic's B[k/4, i, k%4]) equals the HWIO conv."""
    k = intrin_dotprod.KERNEL
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (3, 3, 20, 10)).astype(np.int8)  # C, F not multiples of 16, 4
    x = rng.integers(-128, 128, (5, 5, 20)).astype(np.float64)
    packed = _pack_conv_weight(w, k).astype(np.float64)
    assert packed.shape == (3, 3, 3, 2, 4, 4, 4)
    xp = np.pad(x, [(0, 0), (0, 0), (0, 12)])
    for y, xx, f in [(0, 0, 0), (2, 1, 9), (1, 2, 5)]:
        want = sum(x[y + i, xx + j, c] * w[i, j, c, f] for i in range(3) for j in range(3) for c in range(20))
        got = sum(xp[y + i, xx + j, c] * packed[f // 4, i, j, c // 16, c % 16 // 4, f % 4, c % 4]
                  for i in range(3) for j in range(3) for c in range(32))
        assert got == want
    dense = rng.integers(-128, 128, (40, 6)).astype(np.int8)  # [K, N]
    pd = _pack_dense_weight(dense, k)
    assert pd.shape == (2, 3, 4, 4, 4)
    assert np.array_equal(pd[1, 1, 2, 1, :], dense[16 + 8:16 + 12, 4 + 1])
    assert not pd[1, :, :, 2:, :].any() and not pd[:, 2, 2:].any()  # padding outputs 6, 7; channels 40–47


def test_kernel_is_preferred_on_dotprod_only_where_channels_fit():
    kernels = dot_kernels(graphopt.get_target("arm-a55"))
    assert kernels[0] is intrin_dotprod.KERNEL and kernels[1].intrin == "sdot_4x4_i8i8s32"
    assert intrin_dotprod.KERNEL not in dot_kernels(graphopt.get_target("arm-a53"))
    w = np.full((3, 3, 64, 8), -128, np.int8)
    assert int8.choose(kernels, w, 64) is intrin_dotprod.KERNEL  # −128 is fine: no int16 pairs
    assert int8.choose(kernels, w[:, :, :8], 8).intrin == "sdot_4x4_i8i8s32"  # 8 channels: no padding
    assert int8.choose(kernels, w[:, :, :3], 3).intrin == "sdot_4x4_i8i8s32"  # RGB stem


@pytest.mark.emulation
@pytest.mark.parametrize("target", ["arm-a55", "arm-a76"])
def test_quantized_model_is_bit_exact_and_uses_indexed_sdot(target):
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump")
    torch.manual_seed(0)
    x = saturating_inputs(SHAPE)[3]
    calib = [(torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    q = graphopt.quantize(_Net().eval(), (x,), calib)
    ig = graphopt.to_integer(q, (x,))
    weights = [b for n, b in ig.named_buffers() if n.endswith("_weight_int")]
    assert min(int(w.min()) for w in weights) <= -127 and max(int(w.max()) for w in weights) == 127
    cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False)
    assert cm.report.lowering["scheduled"].get("tensorized_dot", 0) >= 4
    for inp in saturating_inputs(SHAPE):
        got, want = cm(inp), ig(inp)
        assert torch.equal(got, want), f"max difference {(got.float() - want.float()).abs().max()}"
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(cm.build_dir / "model.so")],
                         capture_output=True, text=True, check=True).stdout
    indexed = re.findall(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.4b\[([0-3])\]", asm)
    assert set(indexed) == {"0", "1", "2", "3"}  # the 4 chunks of each 16-byte activation load
