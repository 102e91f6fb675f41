"""Grouped int8 convs as a dense dot-kernel conv per group (`int8.legalize_grouped_dot` + `schedules.TensorizedDot`,
on targets with an int8 dot instruction): bit-exact against the folded integer graph and `graphopt.qref` on the
host and emulated ARM — group widths that are not a multiple of the kernel depth (6, 5 channels), stride 2 with
padding 0, a 1×1 grouped conv on the 16-deep indexed ``sdot`` kernel, weights at −128, a group whose outputs no
kernel's lanes divide (declined: the grouped / generic kernel) — and the declines."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_tools
from torch import nn

import graphopt
from graphopt import qref
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.targets.spec import Feature

SHAPE = (1, 3, 11, 11)


class Grouped(nn.Module):
    """ResNeXt / ShuffleNet-style grouped convs with in-place activations and a residual ``out += x``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 1)
        self.g1 = nn.Conv2d(24, 32, 3, padding=1, groups=4)  # 6 → 8 per group (mobilenet_blocks' last conv)
        self.g2 = nn.Conv2d(32, 64, 3, stride=2, groups=4)  # 8 → 16, stride 2, padding 0: 11×11 → 5×5
        self.g3 = nn.Conv2d(64, 48, 1, groups=4)  # 16 → 12, 1×1: the 16-deep indexed sdot on aarch64
        self.g4 = nn.Conv2d(48, 40, 3, padding=1, groups=8)  # 6 → 5: no kernel's lanes divide 5
        self.fc = nn.Linear(40, 7)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        x = self.act(self.stem(x))
        out = self.g1(x)
        out += torch.cat([x, x[:, :8]], 1)
        x = self.act(self.g3(self.act(self.g2(self.act(out)))))
        return self.fc(self.act(self.g4(x)).mean((2, 3)))


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(SHAPE, generator=g), 4 * torch.randn(SHAPE, generator=g), torch.full(SHAPE, 1e3),
            torch.full(SHAPE, -1e3)]


@pytest.fixture(scope="module", params=["minmax", "percentile"])
def quantized(request):
    """Plain weight ranges, and clipped ones that put −128 in every layer's weights."""
    torch.manual_seed(0)
    scheme = graphopt.QuantScheme() if request.param == "minmax" else \
        graphopt.QuantScheme(weight_observer="percentile", percentile=90)
    x = _inputs()[0]
    calib = [(torch.randn(4, *SHAPE[1:], generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    q = graphopt.quantize(Grouped().eval(), (x,), calib, scheme)
    return q, to_integer(q, (x,)), x


def _grouped_dot_layers(spec) -> list[str]:
    """The layers `legalize_grouped_dot` takes on `spec`: sdot's 4 lanes divide 8, 16 and 12 outputs per group;
    VNNI's 16 only 16."""
    if spec.has(Feature.DOTPROD):
        return ["conv2d 3x3 24->32 groups=4", "conv2d 3x3 32->64 groups=4", "conv2d 1x1 64->48 groups=4"]
    return ["conv2d 3x3 32->64 groups=4"] if spec.has(Feature.AVX512_VNNI) else []


def _assert_exact(quantized, target: str):
    q, ig, x = quantized
    cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False)
    layers = [d["layer"] for d in cm.report.lowering.get("weight_storage", {}).get("layers", [])]
    assert [layer for layer in layers if "groups=" in layer] == _grouped_dot_layers(get_target(target)), layers
    for inp in _inputs():
        want = ig(inp)
        got = cm(inp)
        assert torch.equal(got, want), f"{target}: max difference {(got.float() - want.float()).abs().max()}"
        assert np.array_equal(want.numpy(), qref.run(ig, [inp])[0])


def test_host_is_bit_exact(quantized):
    _assert_exact(quantized, "host")


@pytest.mark.emulation
def test_arm_a55_is_bit_exact(quantized):
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    _assert_exact(quantized, "arm-a55")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["arm-a53", "arm-a76"])
def test_other_arm_targets_are_bit_exact(quantized, target):
    """arm-a76 (dotprod) takes the per-group sdot kernels; arm-a53 (no dotprod) keeps the grouped kernel."""
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    _assert_exact(quantized, target)


def _legalize(c: int, f: int, groups: int, k: int = 3, target: str = "arm-a55"):
    from tvm import relax

    from graphopt.targets.lowering.int8 import legalize_grouped_dot
    from graphopt.targets.lowering.kernels import dot_kernels

    w = np.random.default_rng(0).integers(-128, 128, (k, k, c // groups, f), dtype=np.int8)
    data = relax.Var("x", relax.TensorType((1, 9, 9, c), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [data]):
        call = bb.normalize(relax.op.nn.conv2d(data, relax.const(w), groups=groups, padding=1, data_layout="NHWC",
                                               kernel_layout="HWIO", out_dtype="int32"))
        out = legalize_grouped_dot(bb, call, dot_kernels(get_target(target)))
        bb.emit_func_output(data)
    return out, w


def test_weight_packing_is_the_dense_layout():
    """Each output channel's weights over its own group's channels, padded to whole 4-deep chunks: the packed
    constant against the HWIO weights (sdot 4×4: ``[F/4, KH, KW, ⌈C/g / 4⌉, 4 lanes, 4]``)."""
    out, w = _legalize(24, 32, 4)
    packed = out.args[1].fields[1].value.numpy()
    assert packed.shape == (8, 3, 3, 2, 4, 4)
    want = np.zeros((3, 3, 8, 32), np.int8)
    want[:, :, :6] = w
    np.testing.assert_array_equal(packed, want.reshape(3, 3, 2, 4, 8, 4).transpose(4, 0, 1, 2, 5, 3))


def test_declines():
    assert _legalize(24, 32, 4)[0] is not None
    assert _legalize(48, 40, 8)[0] is None  # 5 outputs per group: no lanes divide them
    assert _legalize(16, 16, 8)[0] is None  # 2 channels per group: the reduction padded 2×
    assert _legalize(16, 16, 16)[0] is None  # depthwise
    assert _legalize(24, 32, 1)[0] is None  # dense: `legalize_conv2d`


def test_only_targets_with_a_dot_instruction():
    """arm-a53's NEON 4×4 kernel fits the groups but lost to the grouped kernel: `CpuParams.grouped_dot` is off.
    The scalar Cortex-M DSP targets' SMLAD kernels beat their generic kernel (`tests/test_dsp_depthwise.py`);
    the Cortex-M55 keeps its MVE-vectorized generic kernel."""
    from graphopt.targets.lowering.schedules import CpuParams

    assert CpuParams.from_spec(get_target("arm-a55")).grouped_dot
    assert not CpuParams.from_spec(get_target("arm-a53")).grouped_dot
    assert CpuParams.from_spec(get_target("cortex-m4")).grouped_dot
    assert CpuParams.from_spec(get_target("cortex-m7")).grouped_dot
    assert not CpuParams.from_spec(get_target("cortex-m55")).grouped_dot
