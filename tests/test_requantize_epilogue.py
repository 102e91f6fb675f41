"""The int8 kernels' requantize epilogue: the int16 narrowing of `targets/lowering/narrowing.py` against numpy
at the int32 and int16 extremes, the offset folded into the accumulators' initial value
(`targets/lowering/accumulator_init.py`) bit-exact against the integer graph, and what both save per output
of a MobileNetV2 1×1 conv on an emulated Cortex-A55."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from conftest import require_tools, saturating_inputs
from torch import nn
from tvm import s_tir, te, tirx

import graphopt
from graphopt import qref
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.targets.lowering.dot import DOT_ATTR
from graphopt.targets.lowering.fixed_point import use_sqrdmulh
from graphopt.targets.lowering.narrowing import narrow_through_int16

# int32 values where sat16, the int16 zero-point add or the int8 bounds change the result
_EDGES = np.array([-2 ** 31, 2 ** 31 - 1, -2 ** 15 - 1, -2 ** 15, -2 ** 15 + 1, 2 ** 15 - 2, 2 ** 15 - 1, 2 ** 15,
                   -32768 + 100, 32767 - 100, -129, -128, -127, -1, 0, 1, 126, 127, 128, 255, 256], np.int64)


def _narrowing_kernel(zp: int, lo: int, hi: int, n: int):
    """int8 = clamp(x + zp, lo, hi) of int32 x, and int32 = (int8 clamp of x) · 3 (a narrowing widened
    again), 16 lanes per vector."""
    x = te.placeholder((n,), "int32", name="x")
    clamped = lambda i: tirx.Min(tirx.Max(x[i] + zp, tirx.const(lo, "int32")), tirx.const(hi, "int32"))  # noqa: E731
    out = te.compute((n,), lambda i: clamped(i).astype("int8"), name="out")
    wide = te.compute((n,), lambda i: clamped(i).astype("int8").astype("int32") * 3, name="wide")
    sch = s_tir.Schedule(te.create_prim_func([x, out, wide]))
    for name in ("out", "wide"):
        _, inner = sch.split(sch.get_loops(sch.get_sblock(name))[0], [None, 16])
        sch.vectorize(inner)
    return narrow_through_int16(tvm.IRModule({"main": sch.mod["main"]}))


@pytest.mark.parametrize(("zp", "lo", "hi"), [(5, -128, 127), (-128, -128, 127), (-22, -128, 127), (-3, -3, 127),
                                              (17, -60, 90), (0, -128, 127)])
def test_int16_narrowing_is_exact_at_the_extremes(zp, lo, hi):
    rng = np.random.default_rng(zp - lo)
    values = np.concatenate([_EDGES, _EDGES - zp, _EDGES + zp, rng.integers(-2 ** 31, 2 ** 31, 256),
                             rng.integers(-300, 300, 256)])
    values = np.clip(values, -2 ** 31, 2 ** 31 - 1).astype(np.int32)
    values = np.resize(values, -(-values.size // 16) * 16)
    mod = _narrowing_kernel(zp, lo, hi, values.size)
    script = mod.script()
    assert script.count("T.Cast(\"int16\"") == 1  # the stored narrowing rewritten, the widened one not
    assert ("llvm.sadd.sat" in script) == (zp != 0)
    lib = tvm.build(mod, target=get_target("host").tvm())
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(values.size, np.int8), dev)
    wide = tvm.runtime.tensor(np.zeros(values.size, np.int32), dev)
    lib["main"](tvm.runtime.tensor(values, dev), out, wide)
    want = np.clip(values.astype(np.int64) + zp, lo, hi)
    assert np.array_equal(out.numpy(), want.astype(np.int8))
    assert np.array_equal(wide.numpy(), 3 * want)


class _Block(nn.Module):
    """A 1×1 expansion with in-place ReLU, a depthwise 3×3 with ReLU6, a projection with a residual
    ``out += x``, and a Linear head: every int8 kernel kind with a bias to fold."""

    def __init__(self):
        super().__init__()
        self.expand, self.act = nn.Conv2d(16, 64, 1), nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv2d(64, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        out = self.project(nn.functional.relu6(self.dw(self.act(self.expand(x)))))
        out += x
        return self.head(out.mean((2, 3)))


def _quantized(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    calib = [(torch.randn(shape, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    q = graphopt.quantize(_Block().eval(), (x,), calib)
    return q, to_integer(q, (x,)), x


def _conv_inits(ir_module) -> list:
    """The initial values of the int8 convs' tensorized accumulators (not the Linear head's: its 10 outputs
    are padded to whole vectors, an accumulator `accumulator_init` leaves at 0)."""
    found = []
    for gv, func in ir_module.functions_items():
        if isinstance(func, tirx.PrimFunc) and "conv2d_int8" in gv.name_hint:
            tvm_ffi.structural_walk(func.body, (s_tir.SBlock, lambda b: found.append(b.body.value) if (
                DOT_ATTR in b.annotations and b.name_hint.endswith("_init")) else None))
    return found


@pytest.mark.parametrize("target", ["host", pytest.param("arm-a55", marks=pytest.mark.emulation)])
def test_offset_folded_into_the_accumulators_is_bit_exact(target):
    from graphopt.targets.lowering.phases import lower

    if target != "host":
        require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    shape = (1, 16, 8, 8)
    q, ig, x = _quantized(shape)
    inits = _conv_inits(lower(torch.export.export(ig, (x,)).run_decompositions(), get_target(target)).ir_module)
    assert len(inits) == 2 and not any(isinstance(v, tvm.ir.prim.expr.IntImm) for v in inits)  # both at their offset
    cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False)
    for inp in saturating_inputs(shape):
        want = ig(inp)
        assert torch.equal(cm(inp), want), f"max difference {(cm(inp).float() - want.float()).abs().max()}"
        assert np.array_equal(want.numpy(), qref.run(ig, [inp])[0])


@pytest.mark.emulation
def test_pointwise_conv_instructions_per_output_on_a55():
    """mobilenet_blocks' 1×1 16→64 conv at 16×16 (16 sdot per 16 outputs): 3.01 instructions per output with
    a zeroed accumulator and the narrowing on 4 int32 lanes (49,308 per call), 2.46 with both (40,338), ~2.36 with
    its weights kept in registers over 2-pixel × 16-channel tiles (`TensorizedDot._weights_in_registers`)."""
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import kernel_counts

    shape = (1, 16, 16, 16)
    q, ig, x = _quantized(shape)
    spec = get_target("arm-a55")
    lowered = lower(torch.export.export(ig, (x,)).run_decompositions(), spec)
    counts = kernel_counts(lowered.ir_module, spec)
    expand = [c for name, c in counts.items()  # the first conv (later ones are conv2d_int81, ...)
              if name.startswith("fused_conv2d_int8_") and "depthwise" not in name]
    assert len(expand) == 1, list(counts)
    per_output = expand[0]["instructions_per_call"] / (16 * 16 * 64)
    assert per_output < 2.42, per_output


def _srdhm_kernel(lo: int, hi: int, s: int, k: int, n: int):
    """int32 = SRDHM(clamp(x, lo, hi) << s, 2^k) in the int64 form the converters write, 4 lanes per vector."""
    x = te.placeholder((n,), "int32", name="x")
    wide = lambda e: e.astype("int64")  # noqa: E731
    out = te.compute((n,), lambda i: ((wide(tirx.Min(tirx.Max(x[i], lo), hi) << s) * (1 << k) + (1 << 30)) >> 31)
                     .astype("int32"), name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    _, inner = sch.split(sch.get_loops(sch.get_sblock("out"))[0], [None, 4])
    sch.vectorize(inner)
    return use_sqrdmulh(tvm.IRModule({"main": sch.mod["main"]}))


@pytest.mark.parametrize(("lo", "hi", "s", "k"), [(-125, 130, 20, 30), (-255, 255, 20, 11), (-128, 127, 23, 8),
                                                  (-2 ** 11, 2 ** 11 - 1, 20, 29)])
def test_srdhm_by_a_power_of_two_of_a_shifted_operand_is_a_shift(lo, hi, s, k):
    """`fixed_point._exact_shift`: SRDHM(x << s, 2^k) with s + k ≥ 31 is x << (s + k − 31), exactly (numpy's
    int64 formula, every x in the clamp's range and beyond it); other shifts keep the ``sqrdmulh``."""
    mod = _srdhm_kernel(lo, hi, s, k, 4096)
    rewritten = "sqrdmulh" not in mod.script()
    assert rewritten == (s + k >= 31 and max(-lo, hi + 1) <= 2 ** (31 - s)), mod.script()
    if not rewritten:
        return
    values = np.concatenate([np.arange(lo - 8, hi + 8), np.array([-2 ** 31, 2 ** 31 - 1, 0, -1, 1])])
    values = np.resize(values, 4096).astype(np.int32)
    lib = tvm.build(mod, target=get_target("host").tvm())
    out = tvm.runtime.tensor(np.zeros(4096, np.int32))
    lib["main"](tvm.runtime.tensor(values), out)
    a = np.clip(values.astype(np.int64), lo, hi) << s
    assert np.array_equal(out.numpy(), ((a * (1 << k) + (1 << 30)) >> 31).astype(np.int32))


@pytest.mark.emulation
def test_residual_projection_bit_exact_and_instructions_on_a55():
    """depthwise_concat's first block (an RGB stem, torchvision's inverted residual 16→64→16 at 16×16): the
    projection kernel with the residual add rescales the operand at the output's scale by a shift instead of a
    shift and a ``sqrdmulh`` (`fixed_point._exact_shift`): 49,620 → 48,724 instructions per call; bit-exact."""
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import kernel_counts
    from graphopt.torchvision_style import Conv2dNormActivation, InvertedResidualV2

    torch.manual_seed(0)
    shape = (1, 3, 32, 32)
    model = nn.Sequential(Conv2dNormActivation(3, 16, stride=2, activation_layer=nn.ReLU6),
                          InvertedResidualV2(16, 16, 1, 4)).eval()
    x = torch.randn(shape)
    q = graphopt.quantize(model, (x,), [(torch.randn(shape, generator=torch.Generator().manual_seed(i)),)
                                        for i in range(4)])
    ig = to_integer(q, (x,))
    cm = graphopt.compile(q, (x,), "arm-a55", progress=False, count_instructions=False)
    for inp in saturating_inputs(shape):
        want = ig(inp)
        assert torch.equal(cm(inp), want), f"max difference {(cm(inp).float() - want.float()).abs().max()}"
        assert np.array_equal(want.numpy(), qref.run(ig, [inp])[0])
    spec = get_target("arm-a55")
    mod = lower(torch.export.export(ig, (x,)).run_decompositions(), spec).ir_module
    kept = {gv: f for gv, f in mod.functions_items()
            if not isinstance(f, tirx.PrimFunc) or ("conv2d_int8" in gv.name_hint and "left_shift" in gv.name_hint)}
    counts = kernel_counts(tvm.IRModule(kept), spec)
    assert len(counts) == 1, list(counts)
    assert next(iter(counts.values()))["instructions_per_call"] < 49200, counts
