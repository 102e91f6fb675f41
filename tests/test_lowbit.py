"""Packed low-bit kernels (graphopt.targets.lowbit): bit-exact vs the folded integer graph on the host
and on emulated aarch64, for int4/int2 weights, 1-bit weights with 8-bit activations, and binary
(a1w1) XNOR-popcount layers; the built module keeps the weights packed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_tools
from torch import nn

import graphopt
from graphopt.quantize import QuantScheme

X = torch.randn(1, 40, 6, 6, generator=torch.Generator().manual_seed(3))
CALIBRATION = [torch.randn(4, 40, 6, 6, generator=torch.Generator().manual_seed(4))]


class Net(nn.Module):
    """3×3 pad 1 stride 1 and 2, 1×1, grouped, dense; channel counts not multiples of 32."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(40, 24, 3, padding=1)
        self.c2 = nn.Conv2d(24, 36, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(36, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.fc = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        y = torch.relu(self.g(torch.relu(self.c3(y))))
        return self.fc(y.flatten(1))


def _model(kind: str):
    torch.manual_seed(0)
    net = Net().eval()
    if kind in ("w4a8", "w2a8"):
        return graphopt.quantize(net, (X,), CALIBRATION, QuantScheme(weights=int(kind[1]), activations=8,
                                                                     keep_first_last_8bit=False))
    bm = graphopt.binarize(net, (X,), keep_first_last=False, binary_activations=kind == "a1w1",
                           calibration=CALIBRATION)
    opt = torch.optim.SGD(bm.parameters(), lr=0.01)
    bm(X).square().mean().backward()
    opt.step()
    return graphopt.convert(bm)


def _constants(mod) -> list[np.ndarray]:
    """Every tensor constant of the lowered module's ``main``."""
    import tvm
    from tvm import relax

    found = []

    def visit(e):
        if isinstance(e, tvm.ir.expr.Constant) and hasattr(e.value, "numpy"):
            found.append(e.value.numpy())

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


SLOW = pytest.mark.slow


@pytest.mark.parametrize("kind", ["a1w1", "w4a8", pytest.param("w1a8", marks=SLOW), pytest.param("w2a8", marks=SLOW)])
def test_host_is_bit_exact_and_uses_packed_kernels(kind):
    qm = _model(kind)
    want = graphopt.to_integer(qm, (X,))(X)
    cm = graphopt.compile(qm, (X,), "host", progress=False)
    assert torch.equal(cm(X), want)
    scheduled = cm.report.lowering["scheduled"]
    if kind == "a1w1":  # 3 convs + dense: packing + popcount kernels (the grouped conv: int8 × 1-bit)
        assert scheduled.get("tuned") == 7
    assert not cm.report.lowering["unscheduled"]


@pytest.mark.parametrize("kind,bits", [("a1w1", 1), pytest.param("w4a8", 4, marks=SLOW)])
def test_weights_stay_packed_in_the_lowered_module(kind, bits):
    from graphopt.targets import get_target, lowbit
    from graphopt.targets.lowering import lower

    ig = graphopt.to_integer(_model(kind), (X,))
    ep = torch.export.export(ig, (X,)).run_decompositions()
    consts = _constants(lower(ep, get_target("host")).ir_module)
    weights = [(40 * 24 * 9, "c1"), (24 * 36 * 9, "c2"), (36 * 16, "c3"), (8 * 16 * 9, "g"), (144 * 10, "fc")]
    assert not [c.shape for c in consts if c.dtype == np.int8 and c.size >= 64], "an unpacked int8 weight was stored"
    if kind == "a1w1":  # channel words: ⌈C/word⌉ per tap and output channel (F padded to the tile)
        word = lowbit.word_for(get_target("host"))

        def words(f, c, taps):
            return -(-f // lowbit.F_TILE) * lowbit.F_TILE * taps * word.count(c)

        stored = sorted(c.size for c in consts if c.dtype == np.dtype(word.dtype))
        assert stored == sorted([words(24, 40, 9), words(36, 24, 9), words(16, 36, 1), words(10, 144, 1)])
        assert sorted(c.size for c in consts if c.dtype == np.uint8) == [8 * 16 * 9 // 8]  # grouped g: 1 bit
    else:
        packed = sorted(c.size for c in consts if c.dtype == np.uint8)
        assert packed == sorted(n * bits // 8 for n, _ in weights)


@pytest.mark.emulation
@pytest.mark.parametrize("kind", ["a1w1", "w1a8", pytest.param("w4a8", marks=SLOW)])
def test_emulated_aarch64_is_bit_exact(kind):
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    qm = _model(kind)
    cm = graphopt.compile(qm, (X,), "arm-a53", progress=False, count_instructions=False)
    assert torch.equal(cm(X), graphopt.to_integer(qm, (X,))(X))


def test_border_table_matches_direct_padding_correction():
    from graphopt.targets.lowbit import _border_table

    rng = np.random.default_rng(0)
    w = rng.choice(np.array([-1, 1], np.int8), size=(5, 3, 3, 3))
    bias = rng.integers(-50, 50, 5)
    table, hcls, wcls = _border_table(w, bias, (4, 5), (2, 1), (1, 1), (1, 1))
    pad = np.ones((3, 6, 7), bool)
    pad[:, 1:5, 1:6] = False
    for oy in range(2):
        for ox in range(5):
            win = pad[:, oy * 2:oy * 2 + 3, ox:ox + 3]
            corr = (w * win[None]).reshape(5, -1).sum(1)
            assert np.array_equal(table[hcls[oy], wcls[ox]], 3 * 9 + bias + corr)  # taps packed as −1


@pytest.mark.parametrize("scale,zp,thr", [(0.0349, 1, 1), (0.25, 0, 0), (0.5, -3, 2), (0.1, 0, -128), (0.1, 5, 127)])
def test_sign_of_quantized_float_matches_quantize_then_compare(scale, zp, thr):
    """The binary conv's packing tests floats directly (quantize folded away), exact at rounding ties."""
    import tvm
    from graphopt.targets.lowbit import _quantized_at_least
    from tvm import te

    inv = np.float32(1.0 / scale)
    ties = (np.arange(-140, 140, dtype=np.float32) + np.float32(0.5)) / inv
    near = np.concatenate([np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, -np.float32(np.inf)), ties])
    x = np.concatenate([near, np.random.default_rng(0).normal(0, 40 * scale, 4096).astype(np.float32)])
    want = torch.ops.quantized_decomposed.quantize_per_tensor(torch.from_numpy(x), scale, zp, -128, 127,
                                                              torch.int8) >= thr
    sign = _quantized_at_least(scale, zp, -128, 127, thr)
    xt = te.placeholder((x.size,), "float32", name="x")
    out = te.compute(xt.shape, lambda i: sign(xt[i]).astype("int8"), name="sign")
    f = tvm.compile(te.create_prim_func([xt, out]), target="llvm")
    got = tvm.runtime.tensor(np.zeros(x.size, np.int8))
    f(tvm.runtime.tensor(x), got)
    assert np.array_equal(got.numpy().astype(bool), want.numpy())


def _edge_model(kind: str):
    """`edge_models.EdgeSizes` quantized as `kind`, and its example input."""
    from edge_models import EdgeSizes, edge_input

    torch.manual_seed(0)
    net, x, calibration = EdgeSizes().eval(), edge_input(), [edge_input(2, batch=8)]
    if kind in ("w4a8", "w2a8"):
        return graphopt.quantize(net, (x,), calibration, QuantScheme(weights=int(kind[1]), activations=8,
                                                                     keep_first_last_8bit=False)), x
    bm = graphopt.binarize(net, (x,), keep_first_last=False, binary_activations=kind == "a1w1", calibration=calibration)
    opt = torch.optim.SGD(bm.parameters(), lr=0.01)
    (sum(y.square().mean() for y in bm(x)) + sum(p.square().sum() for p in bm.parameters())).backward()
    opt.step()  # the weight decay term moves every weight (convert refuses an untrained module)
    return graphopt.convert(bm), x


@pytest.mark.parametrize("kind,target", [("a1w1", "host"), ("w4a8", "host"), pytest.param("w2a8", "host", marks=SLOW),
                                         pytest.param("w1a8", "host", marks=SLOW),
                                         pytest.param("a1w1", "arm", marks=SLOW), pytest.param("w4a8", "arm", marks=SLOW),
                                         pytest.param("a1w1", "cortex-m4", marks=SLOW),
                                         pytest.param("w2a8", "cortex-m4", marks=SLOW)])
def test_edge_sizes_are_bit_exact(kind, target):
    """Low-bit `EdgeSizes` (reductions of length 1, 1×1 maps, kernels larger than their input, ...)
    on the packed and XNOR-popcount kernels, equal to the integer graph and to `graphopt.qref`. The
    binary depthwise 1×1 with a channel multiplier (a reduction of length 1) used to differ."""
    from edge_models import TOOLS, assert_bit_exact

    require_tools(*TOOLS.get(target, ()))
    qm, x = _edge_model(kind)
    integer_graph = graphopt.to_integer(qm, (x,))
    cm = graphopt.compile(qm, (x,), target, progress=False, **({} if target == "host" else {"count_instructions": False}))
    if kind == "a1w1":
        assert cm.report.lowering["scheduled"].get("tuned", 0) >= 10  # the XNOR-popcount kernels
    assert_bit_exact(cm, integer_graph)
