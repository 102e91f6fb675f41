"""aarch64's requantize through ``sqrdmulh`` (`targets/lowering/fixed_point.py` and the converters' A64 form).

The arithmetic against the integer reference (`graphopt.qref`'s gemmlowp MultiplyByQuantizedMultiplier)
on every edge of int32 and every shift, with ``sqrdmulh`` modelled in numpy; the TIR rewrite on kernels
that use the pattern in vector loops of every width; and compiled models bit-exact on emulated aarch64
with the intrinsic in their kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import require_tools
from torch import nn
from tvm import te, tirx

import graphopt
from graphopt import qref
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.targets.lowering.fixed_point import INTRINSIC, has_sqrdmulh, use_sqrdmulh
from graphopt.targets.lowering.phases import lower

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def _sqrdmulh(a, b):
    """AArch64 SQRDMULH (32-bit lanes): saturate((2·a·b + 2^31) ≫ 32)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    wide = (2 * a.astype(object) * b + (1 << 31)) >> 32  # object: 2·a·b overflows int64 at the edges
    return np.clip(wide.astype(np.int64), INT32_MIN, INT32_MAX)


def _a64_form(x, m, shift):
    """The converters' A64 requantize: sqrdmulh by M0, then the rounding shift as sqrdmulh by 2^(31−right)."""
    left, right = max(shift, 0), max(-shift, 0)
    x = np.clip(np.asarray(x, np.int64) << left, INT32_MIN, INT32_MAX)
    high = _sqrdmulh(x, m)
    if right == 0:
        return high
    return _sqrdmulh(high + (high >> 31), np.int64(1) << (31 - right))


def test_a64_form_equals_the_reference_on_int32_edges():
    rng = np.random.default_rng(0)
    edges = np.array([INT32_MIN, INT32_MIN + 1, -(2 ** 30) - 1, -(2 ** 30), -3, -2, -1, 0, 1, 2, 3, 2 ** 30,
                      INT32_MAX - 1, INT32_MAX], np.int64)
    xs = np.concatenate([edges, rng.integers(INT32_MIN, INT32_MAX, 4000, endpoint=True),
                         rng.integers(-70000, 70000, 4000)])
    for m in [1 << 30, (1 << 30) + 1, 1518500250, INT32_MAX - 1, INT32_MAX]:
        for shift in [*range(-31, 1), 1, 5]:
            want = qref._mbqm(xs, m, shift)
            np.testing.assert_array_equal(_a64_form(xs, m, shift), want, err_msg=f"m={m} shift={shift}")
    # ties of the rounding shift: x·M0 at exact halves, both signs (RDBPOT rounds them away from zero)
    for right in range(1, 31):
        half = np.array([(1 << right) * k + (1 << (right - 1)) for k in (-3, -1, 0, 2)], np.int64)
        for x in (half, -half):
            np.testing.assert_array_equal(_a64_form(x, INT32_MAX, -right), qref._mbqm(x, INT32_MAX, -right))


def _kernel(width: int, nudge: int = 1 << 30, shift: int = 31):
    """y[i] = int32((int64(a[i])·int64(m[i % 16]) + nudge) ≫ shift), its loop vectorized by `width`."""
    a = te.placeholder((48,), "int32", name="a")
    m = te.placeholder((16,), "int32", name="m")
    y = te.compute((48,), lambda i: ((a[i].astype("int64") * m[i % 16].astype("int64") + nudge) >> shift)
                   .astype("int32"), name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, m, y]))
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    if width > 1:
        sch.vectorize(sch.split(loop, [None, width])[1])
    return sch.mod


def _vector_widths(mod) -> list[int]:
    import tvm_ffi

    widths = []
    tvm_ffi.structural_walk(mod["main"], (tirx.For, lambda f: widths.append(int(f.extent))
                                          if f.kind == tirx.ForKind.VECTORIZED else None))
    return widths


@pytest.mark.parametrize("width, vectors", [(1, []), (2, [2]), (4, [4]), (8, [4]), (16, [4]), (3, [])])
def test_rewrite_keeps_vectors_the_intrinsic_is_selected_for(width, vectors):
    """sqrdmulh exists for 1, 2 and 4 int32 lanes: wider loops run as unrolled 4-lane vectors, odd ones scalar."""
    mod = use_sqrdmulh(_kernel(width))
    assert INTRINSIC in mod["main"].script()
    assert _vector_widths(mod) == vectors
    lib = tvm.build(mod, target=get_target("arm-a55").tvm())  # LLVM selects it (it aborts on wider vectors)
    assert "sqrdmulh" in lib.inspect_source("asm")


@pytest.mark.parametrize("nudge, shift", [(1 << 31, 32), (1 << 29, 31), (1 << 30, 30)])
def test_rewrite_leaves_other_roundings_alone(nudge, shift):
    mod = _kernel(4, nudge, shift)
    assert use_sqrdmulh(mod)["main"].same_as(mod["main"])


def test_only_aarch64_neon_targets_take_it():
    assert [t for t in ("host", "arm-a53", "arm-a55", "arm-a76", "armv7", "cortex-m4")
            if has_sqrdmulh(get_target(t))] == ["arm-a53", "arm-a55", "arm-a76"]


class _Net(nn.Module):
    """Requantizes with right shifts of 0 and > 0, a residual add (qadd), a concat, a depthwise conv, a
    linear head; large activations make some multipliers exceed 1 (left shifts)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y + self.b(y)
        z = torch.cat([y, 4 * self.c(y)], 1)
        return self.fc(z.mean((2, 3)))


@pytest.mark.emulation
@pytest.mark.parametrize("target", ["arm-a55", pytest.param("arm-a53", marks=pytest.mark.slow),
                                    pytest.param("arm-a76", marks=pytest.mark.slow)])
def test_compiled_requantize_is_bit_exact_with_sqrdmulh(target):
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    q = graphopt.quantize(_Net().eval(), (x,), [(torch.randn(2, 3, 8, 8),) for _ in range(2)])
    ig = to_integer(q, (x,))
    spec = get_target(target)
    lowered = lower(torch.export.export(ig, (x,)).run_decompositions(), spec)
    assert lowered.ir_module.script().count(INTRINSIC) >= 6  # 4 requantizes, a qadd (its 3 rescales)
    cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False)
    g = torch.Generator().manual_seed(1)
    for inp in (x, 5 * torch.randn(1, 3, 8, 8, generator=g), torch.full((1, 3, 8, 8), -50.0)):
        want = ig(inp)
        assert torch.equal(cm(inp), want)
        assert np.array_equal(want.numpy(), qref.run(ig, [inp])[0])
