"""Lane-uniform conditions (`targets/lowering/lane_conditions.py`): int8 channel concats against numpy on the
host (split points that are and are not multiples of the vector), a quantized concat model bit-exact against
the integer graph and `qref` on an emulated Cortex-A55, and what the rewrite saves on its concat kernel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import require_tools, saturating_inputs
from torch import nn
from tvm import te, topi

import graphopt
from graphopt import qref
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.targets.lowering.schedules import schedule_module


@pytest.mark.parametrize("channels", [(16, 16), (32, 32), (64, 32), (12, 20), (8, 24, 32), (3, 61)])
def test_int8_channel_concat_matches_numpy(channels):
    xs = [te.placeholder((1, 5, 3, c), "int8", name=f"x{i}") for i, c in enumerate(channels)]
    out = topi.concatenate(xs, axis=3)
    spec = get_target("host")
    mod = schedule_module(tvm.IRModule({"main": te.create_prim_func([*xs, out])}), spec)[0]
    lib = tvm.build(mod, target=spec.tvm())
    rng = np.random.default_rng(len(channels))
    for _ in range(3):
        arrays = [rng.integers(-128, 128, (1, 5, 3, c)).astype(np.int8) for c in channels]
        result = tvm.runtime.tensor(np.zeros((1, 5, 3, sum(channels)), np.int8))
        lib["main"](*[tvm.runtime.tensor(a) for a in arrays], result)
        assert np.array_equal(result.numpy(), np.concatenate(arrays, axis=3))


class _Concat(nn.Module):
    """Two 1×1 branches concatenated along the channels, then a 1×1 conv: DepthwiseConcat's ``torch.cat``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
        self.mix = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        return self.mix(torch.cat([nn.functional.relu6(self.a(x)), nn.functional.relu(self.b(x))], 1))


def _quantized(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    calib = [(torch.randn(shape, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    q = graphopt.quantize(_Concat().eval(), (x,), calib)
    return q, to_integer(q, (x,)), x


@pytest.mark.emulation
def test_int8_concat_bit_exact_and_vectorized_on_a55():
    """The int8 8×8×(16+16) concat kernel: 4,924 instructions per call with the select scalarized (a byte load
    and store per element), ~1,150 with whole vectors."""
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import kernel_counts

    shape = (1, 16, 8, 8)
    q, ig, x = _quantized(shape)
    spec = get_target("arm-a55")
    cm = graphopt.compile(q, (x,), "arm-a55", progress=False, count_instructions=False)
    for inp in saturating_inputs(shape):
        want = ig(inp)
        assert torch.equal(cm(inp), want), f"max difference {(cm(inp).float() - want.float()).abs().max()}"
        assert np.array_equal(want.numpy(), qref.run(ig, [inp])[0])
    counts = kernel_counts(lower(torch.export.export(ig, (x,)).run_decompositions(), spec).ir_module, spec)
    concat = [c for name, c in counts.items() if "concatenate" in name]
    assert len(concat) == 1, list(counts)
    assert concat[0]["instructions_per_call"] < 1500, concat[0]
