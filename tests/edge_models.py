"""Layers at the edges of their shapes, shared by the lowering, int8 and low-bit kernel tests.

`EdgeSizes` bundles them into one model (one compile per target covers all of them, which keeps
emulated targets cheap); `tiny_layers(seed)` bundles random layers with 1–3 channels on 1–3 pixel
maps, each reading its own slice of one (2, 3, 3, 3) input."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graphopt import qref

EDGE_SHAPE = (1, 8, 5, 5)
# the cross toolchain and emulator each emulated target needs (conftest.require_tools)
TOOLS = {"arm": ("aarch64-linux-gnu-gcc", "qemu-aarch64"), "arm-a55": ("aarch64-linux-gnu-gcc", "qemu-aarch64"),
         "armv7": ("arm-linux-gnueabihf-gcc", "qemu-arm"), "cortex-m4": ("arm-none-eabi-gcc", "qemu-system-arm")}


class EdgeSizes(nn.Module):
    """One output per edge case (reduction length 1, one channel, 1×1 maps, kernels larger than their
    input, strides larger than their kernel, Linear(1, N) and Linear(N, 1), a 1×1 pooling window)."""

    def __init__(self):
        super().__init__()
        self.grouped1 = nn.Conv2d(8, 16, 1, groups=8)  # one input channel per group: reduction 1
        self.dw_mult = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise, channel multiplier 2
        self.dw1x1_mult = nn.Conv2d(8, 24, 1, groups=8)  # depthwise 1×1, multiplier 3: reduction 1
        self.strided = nn.Conv2d(8, 6, 1, stride=3)  # stride larger than the kernel
        self.strided2 = nn.Conv2d(8, 5, 2, stride=3)
        self.to1 = nn.Conv2d(8, 1, 1)  # one output channel
        self.one = nn.Conv2d(1, 1, 3, padding=1)  # one channel in and out
        self.big = nn.Conv2d(8, 4, 5, padding=2)  # 5×5 kernel on a 1×1 map
        self.big2 = nn.Conv2d(8, 3, 3, padding=1)  # 3×3 kernel on a 2×2 map
        self.pix = nn.Conv2d(8, 7, 1)  # a 1×1 map
        self.fc_n1 = nn.Linear(8, 1)  # Linear(N, 1)
        self.fc_1n = nn.Linear(1, 13)  # Linear(1, N): reduction 1

    def forward(self, x):
        p = F.adaptive_avg_pool2d(x, 1)  # (1, 8, 1, 1)
        q = F.avg_pool2d(x, 2)  # (1, 8, 2, 2)
        v = torch.relu(self.fc_n1(p.flatten(1)))
        return (torch.relu(self.grouped1(x)), self.dw_mult(x), torch.relu(self.dw1x1_mult(x)),
                self.strided(x), self.strided2(x), self.one(torch.relu(self.to1(x))),
                self.big(p), self.big2(q), self.pix(p), v, self.fc_1n(v),
                F.avg_pool2d(F.avg_pool2d(x, 1, 2), 3, 2, 1))  # a 1×1 window: reduction 1


def edge_input(seed: int = 0, scale: float = 1.0, batch: int = 1) -> torch.Tensor:
    return scale * torch.randn(batch, *EDGE_SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def assert_bit_exact(cm, integer_graph) -> None:
    """The compiled quantized `EdgeSizes` equal to its integer graph and to `graphopt.qref`, output by
    output, on the example input and on one three times larger (saturating)."""
    for inp in (edge_input(), edge_input(1, 3.0)):
        want = integer_graph(inp)
        for i, (got, ref, oracle) in enumerate(zip(cm(inp), want, qref.run(integer_graph, [inp]), strict=True)):
            assert torch.equal(got, ref), f"output {i}"
            assert np.array_equal(ref.numpy(), oracle), f"output {i} (qref)"


class _Slice(nn.Module):
    """``layer(x[:, :c, :h, :w])`` (a Linear reads ``x[:, :c, :1, :1]`` flattened), then ReLU."""

    def __init__(self, layer: nn.Module, c: int, h: int, w: int):
        super().__init__()
        self.layer, self.c, self.h, self.w = layer, c, h, w

    def forward(self, x):
        x = x[:, :self.c, :self.h, :self.w]
        if isinstance(self.layer, nn.Linear):
            x = x.flatten(1)
        return torch.relu(self.layer(x))


class TinyLayers(nn.Module):
    def __init__(self, branches: list[nn.Module], names: list[str]):
        super().__init__()
        self.branches, self.names = nn.ModuleList(branches), names

    def forward(self, x):
        return tuple(b(x) for b in self.branches)


TINY_SHAPE = (2, 3, 3, 3)


def tiny_layers(seed: int, n: int = 12) -> TinyLayers:
    """`n` random convs (groups incl. depthwise with multipliers, kernel 1–5, stride 1–3, padding 0–2,
    dilation 1–2) and Linears on 1–3 channels and 1–3 pixel maps (only shapes with an output)."""
    rng = random.Random(seed)
    branches, names = [], []
    while len(branches) < n:
        c = rng.randint(1, 3)
        if rng.random() < 0.2:
            out = rng.randint(1, 3)
            branches.append(_Slice(nn.Linear(c, out), c, 1, 1))
            names.append(f"Linear({c}, {out})")
            continue
        groups = c if rng.random() < 0.3 else rng.choice([g for g in range(1, c + 1) if c % g == 0])
        out = groups * rng.randint(1, 3)
        k, s, p, d = rng.randint(1, 5), rng.randint(1, 3), rng.randint(0, 2), rng.choice([1, 1, 2])
        h, w = rng.randint(1, 3), rng.randint(1, 3)
        if min(h, w) + 2 * p < d * (k - 1) + 1:
            continue
        torch.manual_seed(rng.randrange(1 << 30))
        branches.append(_Slice(nn.Conv2d(c, out, k, s, p, dilation=d, groups=groups), c, h, w))
        names.append(f"Conv2d({c}, {out}, {k}, stride={s}, padding={p}, dilation={d}, groups={groups}) on {h}×{w}")
    return TinyLayers(branches, names).eval()
