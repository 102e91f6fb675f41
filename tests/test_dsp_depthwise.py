"""Cortex-M DSP depthwise int8 convs (`int8.legalize_depthwise_dsp` + `schedules.DepthwiseDsp`, intrinsics in
`intrin_dsp_depthwise`: SXTB16 + SMLABB/SMLATT, 4 channels per tap) and grouped convs on the dense SMLAD kernels
(`int8.legalize_grouped_dot`) on scalar DSP targets: the weight packing against the HWIO weights, the
declines, bit-exact outputs against the folded integer graph and `graphopt.qref` on cortex-m4 (int16 weights by
default, int8 with ``optimize_for="size"``; weights of −128 and saturating inputs included), and the
depthwise layer's instruction count against the generic int32 kernel it replaced."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import require_tools
from quant_models import Depthwise64
from torch import nn

import graphopt
from graphopt import qref
from graphopt.config import OptimizeFor
from graphopt.quantization import to_integer
from graphopt.targets.lowering import intrin_dsp_depthwise, schedules
from graphopt.targets.lowering.int8 import WeightStorage, legalize_depthwise_dsp, weight_storage

BARE = ("arm-none-eabi-gcc", "qemu-system-arm")
SHAPE = (1, 3, 9, 11)


def _legalize(w: np.ndarray, channels: int, policy: WeightStorage | None = None, **conv):
    """(the legalized call or None, the recorded weight-storage decisions) of an int8 NHWC depthwise conv."""
    from tvm import relax

    data = relax.Var("x", relax.TensorType((1, 9, 9, channels), "int8"))
    bb = relax.BlockBuilder()
    with weight_storage(policy or WeightStorage()) as decisions, bb.function("main", [data]):
        call = bb.normalize(relax.op.nn.conv2d(data, relax.const(w), groups=channels, data_layout="NHWC",
                                               kernel_layout="HWIO", out_dtype="int32", **conv))
        out = legalize_depthwise_dsp(bb, call, intrin_dsp_depthwise.KERNELS)
        bb.emit_func_output(data)
    return out, decisions


@pytest.mark.parametrize(("optimize_for", "dtype"), [(OptimizeFor.BALANCED, "int16"), (OptimizeFor.SIZE, "int8")])
def test_weight_packing(optimize_for, dtype):
    """Each channel's weight at each tap, read through the kernel's layout, is the HWIO weight; the padding
    channels (13 → 16) are zero; the storage follows `optimize_for`."""
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (3, 5, 1, 13), dtype=np.int8)
    w[0, 0, 0, :4] = -128
    out, decisions = _legalize(w, 13, WeightStorage(optimize_for), padding=1)
    packed = out.args[1].fields[1].value.numpy()
    kernel = next(k for k in intrin_dsp_depthwise.KERNELS if k.weight_dtype == dtype)
    assert packed.dtype == np.dtype(dtype)
    assert [(d["kernel"], d["storage"]) for d in decisions] == [(kernel.intrin, dtype)]
    for ky in range(3):
        for kx in range(5):
            got = [int(kernel.weight(packed, (ky, kx, c // 4), c % 4)) for c in range(16)]
            assert got == [int(v) for v in w[ky, kx, 0]] + [0, 0, 0]


def test_declines_multipliers_and_1x1_windows():
    """A channel multiplier of 2 (each call's 4 outputs would read 2 input channels) and a 1×1 window (a
    per-channel scale) are declined: None, nothing recorded."""
    for w in (np.ones((3, 3, 1, 16), np.int8), np.ones((1, 1, 1, 8), np.int8)):
        out, decisions = _legalize(w, 8)
        assert out is None and decisions == []


class _Inverted(nn.Module):
    """An inverted residual as MobileNetV2 writes it: expand, depthwise, project, ``out += x``."""

    def __init__(self, channels: int, hidden: int, kernel: int = 3, dilation: int = 1):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU6(inplace=True))
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, kernel, padding=dilation * (kernel // 2),
                                                 dilation=dilation, groups=hidden), nn.ReLU6(inplace=True))
        self.project = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        out += x
        return out


class DspNet(nn.Module):
    """Depthwise convs of 13 channels (not whole 4-channel calls) at stride 1 and 2, a 5×5 one with dilation
    2 inside a nested residual block, 3×3 on 24 channels; a grouped conv of 4 inputs and 4 outputs per group
    (whole kernel lanes: a dense SMLAD kernel per group), one of 5 outputs per group and a depthwise one of
    channel multiplier 2 (both declined: the generic kernel); odd map sizes, in-place ReLU6."""

    def __init__(self):
        super().__init__()
        act = nn.ReLU6(inplace=True)
        self.stem = nn.Sequential(nn.Conv2d(3, 13, 3, padding=1), act)
        self.dw1 = nn.Sequential(nn.Conv2d(13, 13, 3, padding=1, groups=13), act)
        self.dw2 = nn.Sequential(nn.Conv2d(13, 13, 3, stride=2, padding=1, groups=13), act)  # 9×11 → 5×6
        self.pw = nn.Sequential(nn.Conv2d(13, 12, 1), act)
        self.block = _Inverted(12, 24, kernel=5, dilation=2)
        self.block2 = _Inverted(12, 24)
        self.grouped = nn.Sequential(nn.Conv2d(12, 15, 3, padding=1, groups=3), act)  # 4 in, 5 out per group
        self.pw2 = nn.Sequential(nn.Conv2d(15, 16, 1), act)
        self.grouped4 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), act)  # 4 in, 4 out per group
        self.multiplier = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.pw(self.dw2(self.dw1(self.stem(x))))
        x = self.multiplier(self.grouped4(self.pw2(self.grouped(self.block2(self.block(x))))))
        return self.fc(x.mean((2, 3)))


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(SHAPE, generator=g), 3 * torch.randn(SHAPE, generator=g),
            1e3 * torch.sign(torch.randn(SHAPE, generator=g)), torch.full(SHAPE, -1e3)]


@pytest.fixture(scope="module", params=["minmax", "percentile"])
def quantized(request):
    """Plain weight ranges, and clipped ones that round the most negative weights of every layer to −128."""
    torch.manual_seed(0)
    model = DspNet().eval()
    x = _inputs()[0]
    calib = [(torch.randn(4, *SHAPE[1:], generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    scheme = graphopt.QuantScheme() if request.param == "minmax" else \
        graphopt.QuantScheme(weight_observer="percentile", percentile=90)
    q = graphopt.quantize(model, (x,), calib, scheme)
    ig = to_integer(q, (x,))
    depthwise = [b for n, b in ig.named_buffers() if n.endswith("_weight_int") and b.dim() == 4 and b.shape[1] == 1]
    assert any(int(w.min()) == -128 for w in depthwise) == (request.param == "percentile")
    return q, ig, x


def _assert_exact(quantized, target: str, optimize_for: str) -> None:
    require_tools(*BARE)
    q, ig, x = quantized
    cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False, optimize_for=optimize_for)
    assert cm.report.lowering["scheduled"].get("depthwise_dsp", 0) == 4
    layers = [(d["layer"], d["storage"]) for d in cm.report.lowering["weight_storage"]["layers"]]
    dtype = "int8" if optimize_for == "size" else "int16"
    assert [s for name, s in layers if name.startswith("depthwise")] == [dtype] * 4, layers
    layers = {name for name, _ in layers}
    assert "conv2d 3x3 16->16 groups=4" in layers, layers  # the group-width-4 conv: a dense kernel per group
    assert not {"conv2d 3x3 12->15 groups=3", "conv2d 3x3 16->32 groups=16"} & set(layers), layers
    for inp in _inputs():
        want = ig(inp)
        got = cm(inp)
        assert torch.equal(got, want), f"max difference {(got.float() - want.float()).abs().max()}"
        assert np.array_equal(want.numpy(), qref.run(ig, [inp])[0])


@pytest.mark.emulation
@pytest.mark.parametrize("optimize_for", ["balanced", "size"])
def test_cortex_m4_is_bit_exact(quantized, optimize_for):
    _assert_exact(quantized, "cortex-m4", optimize_for)


@pytest.mark.slow
def test_cortex_m7_is_bit_exact(quantized):
    """The M7 (same DSP instructions, scheduled for its dual-issue pipeline by LLVM)."""
    _assert_exact(quantized, "cortex-m7", "balanced")


@pytest.mark.emulation
def test_depthwise_layer_beats_the_generic_kernel(monkeypatch):
    """MobileNetV2's 64-channel depthwise 3×3 at 16×16 on cortex-m4, requantize epilogue included: the DSP
    kernel's instructions against the generic int32 kernel's (``depthwise_dsp`` off), both bit-exact.
    Measured 0.77× (426.2k against 550.5k, 2.9 and 3.7 per MAC with the epilogue: SMLAxy do one MAC each, plus
    a word load and two SXTB16 per 4 channels and tap shared by 2 pixels' overlapping windows, against the
    generic kernel's LDRSB and SMLABB per MAC with its sums spilled)."""
    require_tools(*BARE)
    torch.manual_seed(0)
    x = torch.randn(1, 16, 16, 16)
    q = graphopt.quantize(Depthwise64().eval(), (x,), [(torch.randn(4, 16, 16, 16),)])
    want = to_integer(q, (x,))(x)

    def layers(dsp: bool) -> list[dict]:
        original = schedules.CpuParams.from_spec.__func__
        monkeypatch.setattr(schedules.CpuParams, "from_spec", classmethod(
            lambda cls, spec: dataclasses.replace(original(cls, spec), depthwise_dsp=dsp)))
        cm = graphopt.compile(q, (x,), "cortex-m4", progress=False, count_instructions=True, cache=False)
        monkeypatch.undo()
        assert cm.report.lowering["scheduled"].get("depthwise_dsp", 0) == int(dsp)
        assert torch.equal(cm(x), want)
        return cm.report.lowering["layers"]

    dsp, generic = layers(True), layers(False)
    call = next(i for i, row in enumerate(dsp) if row.get("layer", "").startswith("depthwise"))
    assert "conv2d" in generic[call]["kernel"] and len(dsp) == len(generic)  # the same call, unfused alike
    assert dsp[call]["instructions"] < 0.85 * generic[call]["instructions"], (dsp[call], generic[call])
