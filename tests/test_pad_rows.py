"""int8 NHWC zero-point pads as row copies (`targets/lowering/pad_rows.py`): the kernel against numpy, the
legalization's refusals, and a depthwise block that reads a padded copy bit-exact on emulated arm-a53 and
armv7 (NEON without dotprod) and cortex-m4 (scalar: row copies except with ``optimize_for="size"``), with the
pad's instructions on arm-a53."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import require_tools, saturating_inputs
from quant_models import Depthwise64
from tvm import relax

import graphopt
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.targets.lowering import pad_rows


@pytest.mark.parametrize("shape, pad, value", [
    ((1, 16, 16, 64), (1, 1, 1, 1), -128),  # whole vectors only
    ((2, 5, 7, 3), (0, 2, 1, 0), 5),  # batch 2, no top or right pad, 21-byte rows
    ((1, 3, 3, 24), (1, 1, 1, 1), 0),  # 72 = 4 vectors + 8 bytes per row
    ((1, 4, 9, 1), (2, 0, 0, 3), 127),  # 1 channel: 1-byte left rest, 3-byte right pad
])
def test_pad_nhwc_matches_numpy(shape, pad, value):
    func = pad_rows.pad_nhwc(shape, pad, value)
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    x = np.random.default_rng(0).integers(-128, 128, shape).astype(np.int8)
    want = np.pad(x, [(0, 0), (pad[0], pad[1]), (pad[2], pad[3]), (0, 0)], constant_values=value)
    got = tvm.runtime.tensor(np.full(want.shape, 77, np.int8), tvm.cpu())
    lib(tvm.runtime.tensor(x, tvm.cpu()), got)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("dtype, widths, mode", [
    ("float32", [0, 0, 1, 1, 1, 1, 0, 0], "constant"),
    ("int8", [0, 0, 1, 1, 1, 1, 0, 1], "constant"),  # the channel axis
    ("int8", [0, 0, 1, 1, 1, 1, 0, 0], "reflect"),
])
def test_other_pads_keep_tvms_legalization(dtype, widths, mode):
    x = relax.Var("x", relax.TensorType((1, 4, 4, 8), dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        out = bb.emit(relax.op.nn.pad(x, widths, mode, 0.0))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps({"relax.nn.pad": pad_rows.legalizer()})(bb.get())
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1 and pad_rows.PAD_ATTR not in (funcs[0].attrs or {})


SHAPE = (1, 16, 16, 16)


@pytest.fixture(scope="module")
def quantized():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    q = graphopt.quantize(Depthwise64().eval(), (x,), [(torch.randn(4, *SHAPE[1:], generator=g),)])
    return q, to_integer(q, (x,)), x


_TOOLS = {"armv7": ("arm-linux-gnueabihf-gcc", "qemu-arm"), "cortex-m4": ("arm-none-eabi-gcc", "qemu-system-arm")}


@pytest.mark.emulation
@pytest.mark.parametrize(("target", "optimize_for", "row_pads"), [
    ("arm-a53", "balanced", 1), ("armv7", "balanced", 1), ("cortex-m4", "balanced", 1),
    ("cortex-m4", "size", 0),  # a scalar target's size build keeps TVM's pad: less code
])
def test_padded_depthwise_is_bit_exact(quantized, target, optimize_for, row_pads):
    require_tools(*_TOOLS.get(target, ("aarch64-linux-gnu-gcc", "qemu-aarch64")))
    q, integer_graph, x = quantized
    cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False, optimize_for=optimize_for)
    assert cm.report.lowering["scheduled"].get("pad_rows", 0) == row_pads, cm.report.lowering["scheduled"]
    for inp in saturating_inputs(SHAPE):
        assert torch.equal(cm(inp), integer_graph(inp))


@pytest.mark.emulation
def test_pad_instructions_on_arm_a53(quantized):
    """The 16×16×64 → 18×18×64 pad: 7,530 instructions per call as TVM legalizes it, 3,383 as row copies."""
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import kernel_counts

    _, integer_graph, x = quantized
    spec = get_target("arm-a53")
    counts = kernel_counts(lower(torch.export.export(integer_graph, (x,)).run_decompositions(), spec).ir_module, spec)
    pads = [c for name, c in counts.items() if name.startswith("pad")]
    assert len(pads) == 1 and pads[0]["instructions_per_call"] < 4_000, counts
