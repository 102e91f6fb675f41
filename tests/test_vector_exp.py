"""float32 ``exp`` in kernels computed in vector registers (`graphopt.targets.lowering.vector_exp`): within 2 ULP of
eˣ for float32 inputs across its whole range (random bit patterns, a uniform sweep, the edges, denormal results,
±inf, NaN) as compiled for the host, sigmoid and tanh over it within 2⁻²³, no ``expf`` call left in a softmax
kernel, and on an emulated Cortex-A53 a transformer's attention needs fewer instructions with the same outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from conftest import require_tools
from tvm.script import tirx as T

import graphopt
from graphopt.targets import get_target
from graphopt.targets.lowering import vector_exp
from graphopt.targets.lowering.phases import lower
from graphopt.zoo import ZOO

N = 1 << 20


def _compiled_exp(fn=T.exp):
    @T.prim_func(s_tir=True)
    def kernel(a: T.Buffer((N,), "float32"), b: T.Buffer((N,), "float32")):
        for i in T.serial(N // 8):
            for j in T.vectorized(8):
                b[i * 8 + j] = fn(a[i * 8 + j])

    mod, changed = vector_exp.vectorizable_exp(tvm.IRModule({"main": kernel}), get_target("host"))
    assert changed == 1
    lib = tvm.compile(mod, target=get_target("host").tvm())

    def run(x: np.ndarray) -> np.ndarray:
        padded = np.zeros(N, np.float32)
        padded[:len(x)] = x
        out = tvm.runtime.tensor(np.zeros(N, np.float32))
        lib["main"](tvm.runtime.tensor(padded), out)
        return out.numpy()[:len(x)]

    return run


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Distance in representable float32 values (non-negative results: their bit patterns are ordered)."""
    return np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))


def test_exp_is_within_2_ulp_everywhere():
    run = _compiled_exp()
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 8 * N, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = [vector_exp.LOW, vector_exp.HIGH, -87.33655, -100.0, -103.97, 1e-30, -1e-30, 0.5 * np.log(2)]
    x = np.concatenate([bits[(bits > vector_exp.LOW - 1) & (bits < vector_exp.HIGH + 1)][:N // 2],
                        rng.uniform(vector_exp.LOW - 1, vector_exp.HIGH + 1, N // 2 - len(edges)),
                        np.array(edges)]).astype(np.float32)
    got = run(x)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64)).astype(np.float32)
    worst = int(np.argmax(_ulps(got, want)))
    assert _ulps(got, want).max() <= 2, (x[worst], got[worst], want[worst])
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 89.0, -104.0], np.float32)
    got = run(special)
    assert got[0] == got[1] == 1.0 and got[2] == np.inf and got[3] == 0.0 and np.isnan(got[4])
    assert got[5] == np.inf and got[6] == 0.0


@pytest.mark.parametrize("fn,reference", [(T.sigmoid, lambda x: 1 / (1 + np.exp(-x))), (T.tanh, np.tanh)])
def test_sigmoid_and_tanh_over_it_stay_within_2_to_the_minus_23(fn, reference):
    """TVM's formulas (``1 / (1 + e⁻ˣ)``, tanh from e^±2x) over `exp_f32`: absolute error at most 2⁻²³, as with
    libm's expf (their relative error near 0 and sigmoid's below −88 are the formulas')."""
    run = _compiled_exp(fn)
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-100, 100, N // 2), rng.normal(0, 3, N // 2 - 4), [0.0, -0.0, 1e-30, 20.0]])
    got = run(x.astype(np.float32)).astype(np.float64)
    err = np.abs(got - reference(x.astype(np.float32).astype(np.float64)))
    assert err.max() <= 2.0**-23, x[np.argmax(err)]


def test_softmax_kernels_call_no_expf():
    model, inputs = ZOO["tiny_transformer"].factory()
    spec = get_target("arm-a53")
    result = lower(torch.export.export(model, inputs).run_decompositions(), spec)
    assert result.stats["vector_exp_kernels"] >= 1
    softmax = [f for gv, f in result.ir_module.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and "softmax" in gv.name_hint]
    assert softmax and not any("T.exp(" in f.script() for f in softmax)


@pytest.mark.emulation
def test_transformer_attention_needs_fewer_instructions_on_a53(monkeypatch):
    """The tiny transformer fp32 as an arm-a53 C library: 251,738 → 203,680 instructions per inference (its two
    attention softmaxes 39,403 → 15,374 each), outputs within float32 rounding of the libm build's."""
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    model, inputs = ZOO["tiny_transformer"].factory()
    vector = graphopt.compile(model, inputs, "arm-a53-c", progress=False, count_instructions=True)
    monkeypatch.setattr(vector_exp, "vectorizable_exp", lambda mod, spec: (mod, 0))
    libm = graphopt.compile(model, inputs, "arm-a53-c", progress=False, count_instructions=True)
    assert vector.report.instructions_per_inference < 0.85 * libm.report.instructions_per_inference, \
        (vector.report.instructions_per_inference, libm.report.instructions_per_inference)
    with torch.no_grad():
        want = model(*inputs)
    torch.testing.assert_close(vector(*inputs), libm(*inputs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vector(*inputs), want, rtol=1e-4, atol=1e-5)
