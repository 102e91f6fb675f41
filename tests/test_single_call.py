"""One kernel call per inference (`targets/lowering/single_call.py`): merged builds against the same build
with the merge declined, bit for bit (fp32 on the host: the kernels are the same code), on code as people
write it — a kernel called twice, in-place residual adds, a channel shuffle, a concat, two outputs —, int8
bit-exact on emulated arm-a53 with fewer instructions, and every refusal recorded in the report."""
from __future__ import annotations

import pytest
import torch
from conftest import require_tools, saturating_inputs
from quant_models import Depthwise64
from torch import nn
from tvm import relax

import graphopt
from graphopt.quantization import to_integer
from graphopt.targets.lowering import single_call


class People(nn.Module):
    """The same 1×1 conv shape twice (one kernel, two calls), ``out += x``, a channel shuffle, a concat,
    and two outputs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        out = torch.relu(self.a(x))
        out += x
        y = self.b(out)
        z = torch.cat([out, y], 1)
        n, c, h, w = z.shape
        z = z.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        z = self.dw(z)
        return self.head(z.mean((2, 3))), z


def _compile(model, x, target, monkeypatch, merge: bool):
    with monkeypatch.context() as m:
        if not merge:
            m.setattr(single_call, "merge_calls", lambda mod: (mod, {"declined": "off in this test"}))
        return graphopt.compile(model, (x,), target, progress=False, cache=False,
                                count_instructions=target != "host")


def _outputs(cm, x):
    out = cm(x)
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("max_calls", [single_call.MAX_CALLS, 2, 3])
def test_merged_host_build_equals_the_unmerged_one(monkeypatch, max_calls):
    """In one merged function, and split into several (tensors crossing between them, a group's result used
    two groups later, both outputs from different groups)."""
    torch.manual_seed(0)
    monkeypatch.setattr(single_call, "MAX_CALLS", max_calls)
    model, x = People().eval(), torch.randn(1, 8, 9, 7)
    merged, separate = (_compile(model, x, "host", monkeypatch, merge) for merge in (True, False))
    stats = merged.report.lowering["single_call"]
    assert stats["calls"] >= 5 and stats["intermediate_bytes"] > 0, stats
    assert stats["functions"] == -(-stats["calls"] // max_calls), stats
    assert separate.report.lowering["single_call"] == {"declined": "off in this test"}
    for inp in [x, *(torch.randn(1, 8, 9, 7) * s for s in (0.1, 10.0))]:
        with torch.no_grad():
            want = model(inp)
        for got, ref, eager in zip(_outputs(merged, inp), _outputs(separate, inp), want, strict=True):
            assert torch.equal(got, ref)
            torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def test_refusals_are_reported(monkeypatch):
    one = graphopt.compile(nn.ReLU().eval(), (torch.randn(1, 8),), "host", progress=False, cache=False)
    assert one.report.lowering["single_call"] == {"declined": "fewer than two kernel calls"}
    monkeypatch.setattr(single_call, "MAX_WORK_PER_CALL", 10)
    big = graphopt.compile(nn.Sequential(nn.Conv2d(8, 8, 1), nn.Sigmoid(), nn.Conv2d(8, 4, 1)).eval(),
                           (torch.randn(1, 8, 4, 4),), "host", progress=False, cache=False)
    declined = big.report.lowering["single_call"]["declined"]
    assert declined.endswith("loop iterations per kernel call, above 10 (compile time)"), declined
    x = relax.Var("x", relax.TensorType((1, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(x, x))  # not legalized: an operator, not a kernel call
            gv = bb.emit_output(relax.Tuple([bb.emit(relax.op.multiply(y, y))]))
        bb.emit_func_output(gv)
    mod = bb.get()
    merged, stats = single_call.merge_calls(mod)
    assert merged.same_as(mod) and stats == {"declined": "a binding other than a kernel call: Call"}


@pytest.mark.emulation
def test_int8_merged_on_arm_a53_is_bit_exact_with_fewer_instructions(monkeypatch):
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    g = torch.Generator().manual_seed(0)
    shape = (1, 16, 16, 16)
    x = torch.randn(shape, generator=g)
    q = graphopt.quantize(Depthwise64().eval(), (x,), [(torch.randn(4, *shape[1:], generator=g),)])
    integer_graph = to_integer(q, (x,))
    merged, separate = (_compile(q, x, "arm-a53", monkeypatch, merge) for merge in (True, False))
    stats = merged.report.lowering["single_call"]
    assert stats["calls"] >= 4 and stats["intermediate_bytes"] > 16 * 16 * 64, stats
    for inp in saturating_inputs(shape):
        assert torch.equal(merged(inp), integer_graph(inp))
    # one VM call instead of one per kernel: the VM's per-call allocations and argument packing go (the
    # counts are deterministic, an instruction proxy, not a time)
    assert merged.report.instructions_per_inference < separate.report.instructions_per_inference - 2_000
