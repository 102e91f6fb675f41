"""Every folded CNN block of `test_qfold_blocks.BLOCKS`, compiled: the artifact equals the folded
integer fx graph bit for bit on the host and (slow) on emulated aarch64. All blocks go into one
model (one build per target), each block with its own input and output, checked on two inputs."""
from __future__ import annotations

import pytest
import torch
from conftest import require_tools
from torch import nn
from test_qfold_blocks import BLOCKS, Block, _bn_stats

import graphopt

SHAPE = (1, 3, 9, 9)


class Blocks(nn.Module):
    """The blocks side by side: input i feeds block i, output i is its result."""

    def __init__(self, names: list[str]):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(BLOCKS[n][0]) for n in names)
        with torch.no_grad():
            self(*(torch.zeros(SHAPE) for _ in names))  # materialize the lazy heads
        _bn_stats(self)

    def forward(self, *xs):
        return tuple(b(x) for b, x in zip(self.blocks, xs))


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(SHAPE, generator=g) for _ in range(n))


def _check(names: list[str], target: str) -> None:
    model = Blocks(names)
    xs = _inputs(len(names), 1)
    qm = graphopt.quantize(model, xs, calibration=[tuple(torch.cat([x] * 4) for x in _inputs(len(names), s))
                                                   for s in (10, 11, 12)])
    ig = graphopt.to_integer(qm, xs)
    cm = graphopt.compile(qm, xs, target, progress=False, count_instructions=False)
    bad = {}
    for seed in (1, 2):
        inputs = _inputs(len(names), seed)
        with torch.no_grad():
            want = ig(*inputs)
        got = cm(*inputs)
        bad.update({n: float((g.double() - w.double()).abs().max()) for n, g, w in zip(names, got, want)
                    if not torch.equal(g, w)})
    assert not bad, f"compiled != integer graph on {target} (max difference in output steps): {bad}"


TARGETS = [pytest.param("host", id="host"),
           pytest.param("arm", id="arm", marks=[pytest.mark.emulation, pytest.mark.slow])]


@pytest.mark.parametrize("target", TARGETS)
def test_folded_blocks_compile_bit_exact(target):
    if target == "arm":
        require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    _check(sorted(BLOCKS), target)
