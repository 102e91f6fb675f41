"""Kernels too small to share between cores run serially (`graphopt.targets.lowering.small_kernels`): the work
estimate counts loop iterations exactly, only kernels below `SERIAL_WORK` lose their parallel loop, outputs stay
bit-identical, and on an emulated Cortex-A55 a transformer needs fewer instructions."""
from __future__ import annotations

import pytest
import torch
import tvm
from conftest import require_tools
from torch import nn
from tvm.script import tirx as T

import graphopt
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.targets.lowering import small_kernels
from graphopt.targets.lowering.phases import lower
from graphopt.zoo import ZOO


def _kernel(rows: int):
    @T.prim_func(s_tir=True)
    def kernel(a: T.Buffer((rows, 16), "float32"), b: T.Buffer((rows, 16), "float32"),
               c: T.Buffer((3, 5), "float32")):
        for i in T.parallel(rows):
            for j in T.vectorized(16):
                b[i, j] = a[i, j] * T.float32(2)
        for i, j in T.grid(3, 5):
            c[i, j] = T.float32(0)

    return kernel


def test_estimated_work_counts_the_iterations_that_store():
    """A vectorized loop is one vector store per iteration of the loops around it."""
    assert small_kernels.estimated_work(_kernel(8)) == 8 + 15
    assert small_kernels.estimated_work(_kernel(4096)) == 4096 + 15


def test_only_kernels_below_the_threshold_lose_their_parallel_loop():
    mod = tvm.IRModule({"small": _kernel(8), "large": _kernel(small_kernels.SERIAL_WORK)})
    out, changed = small_kernels.serial_small_kernels(mod)
    assert changed == 1
    assert "T.parallel" not in out["small"].script() and "T.parallel" in mod["small"].script()
    assert out["large"].same_as(mod["large"])
    assert small_kernels.serial_small_kernels(out)[1] == 0  # a second run changes nothing


class _ConvHead(nn.Module):
    """A 32×32 conv (large: stays parallel) and a pooled linear head (small kernels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _parallel_kernels(ig, x, spec) -> dict[str, bool]:
    mod = lower(torch.export.export(ig, (x,)).run_decompositions(), spec).ir_module
    return {gv.name_hint: "T.parallel" in f.script() for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)}


def test_host_build_is_bit_identical_with_its_small_kernels_serial(monkeypatch):
    torch.manual_seed(0)
    model, x = _ConvHead().eval(), torch.randn(1, 3, 32, 32)
    q = graphopt.quantize(model, (x,), [(torch.randn(1, 3, 32, 32),) for _ in range(4)])
    ig = to_integer(q, (x,))
    spec = get_target("host")
    serial = graphopt.compile(q, (x,), spec, progress=False)
    assert serial.report.lowering["serial_kernels"] >= 2
    kernels = _parallel_kernels(ig, x, spec)
    assert any(v for k, v in kernels.items() if "conv2d" in k), kernels
    assert not any(v for k, v in kernels.items() if "dense" in k or "matmul" in k), kernels
    monkeypatch.setattr(small_kernels, "SERIAL_WORK", 0)
    parallel = graphopt.compile(q, (x,), spec, progress=False)
    assert parallel.report.lowering["serial_kernels"] == 0
    for _ in range(3):
        inp = 3 * torch.randn(1, 3, 32, 32)
        assert torch.equal(serial(inp), parallel(inp))
        assert torch.equal(serial(inp), ig(inp))


@pytest.mark.emulation
def test_transformer_needs_fewer_instructions_on_a55(monkeypatch):
    """The tiny transformer's int8 build on arm-a55 (48 kernels, 44 of them small): 276,218 → 246,834
    instructions per inference, the same outputs."""
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    model, inputs = ZOO["tiny_transformer"].factory()
    q = graphopt.quantize(model, inputs, [inputs] * 4)
    serial = graphopt.compile(q, inputs, "arm-a55", progress=False, count_instructions=True)
    monkeypatch.setattr(small_kernels, "SERIAL_WORK", 0)
    parallel = graphopt.compile(q, inputs, "arm-a55", progress=False, count_instructions=True)
    assert torch.equal(serial(*inputs), parallel(*inputs))
    assert serial.report.instructions_per_inference < 0.95 * parallel.report.instructions_per_inference, \
        (serial.report.instructions_per_inference, parallel.report.instructions_per_inference)
