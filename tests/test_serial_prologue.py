"""Small prologues and epilogue nests of int8 kernels run serially inside the kernel (`schedules.schedule_spatial`'s
``serial_below``, `_SERIAL_PROLOGUE_BYTES`): depthwise_concat's separable branch (a 24-channel depthwise 3×3, its
channels padded to whole 16-channel calls, then a 24→16 1×1 conv whose reduction is padded to 32) bit-exact on an
emulated Cortex-A55 against the integer graph and `qref`, at most one parallel region per kernel, and what that
saves."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import require_tools, saturating_inputs
from torch import nn

import graphopt
from graphopt import qref
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.torchvision_style import Conv2dNormActivation


def _quantized(shape):
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dNormActivation(24, 24, groups=24, activation_layer=nn.ReLU6),
                          Conv2dNormActivation(24, 16, kernel_size=1, activation_layer=nn.ReLU6)).eval()
    x = torch.randn(shape)
    q = graphopt.quantize(model, (x,), [(torch.randn(shape, generator=torch.Generator().manual_seed(i)),)
                                        for i in range(4)])
    return q, to_integer(q, (x,)), x


@pytest.mark.emulation
def test_separable_branch_serial_prologues_on_a55():
    """arm-a55 instructions per call, at most one parallel region per kernel: the depthwise 10,198 → 8,792 (its
    re-laid columns and an epilogue nest of its own in parallel regions of their own), the 1×1 conv 7,598 → 7,072
    (its channel-padded input); in depthwise_concat 11,636 → 10,072 and 5,676 → 5,178."""
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import kernel_counts

    shape = (1, 24, 8, 8)
    q, ig, x = _quantized(shape)
    cm = graphopt.compile(q, (x,), "arm-a55", progress=False, count_instructions=False)
    for inp in saturating_inputs(shape):
        want = ig(inp)
        assert torch.equal(cm(inp), want), f"max difference {(cm(inp).float() - want.float()).abs().max()}"
        assert np.array_equal(want.numpy(), qref.run(ig, [inp])[0])
    spec = get_target("arm-a55")
    mod = lower(torch.export.export(ig, (x,)).run_decompositions(), spec).ir_module
    convs = {gv.name_hint: f for gv, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_int8" in gv.name_hint}
    assert len(convs) == 2, list(convs)
    counts = kernel_counts(mod, spec)
    per_call = {("depthwise" if "depthwise" in n else "pointwise"): c["instructions_per_call"]
                for n, c in counts.items() if "conv2d_int8" in n}
    for name, f in convs.items():
        assert f.script().count("T.parallel") <= 1, name  # none in a kernel `small_kernels` made serial
    assert per_call["depthwise"] < 9300 and per_call["pointwise"] < 7300, per_call
