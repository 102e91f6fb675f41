"""Quantized models through graphopt.compile: folded integer kernels on host and emulated aarch64 are
bit-identical to the numpy reference; PT2E (torchao XNNPACK quantizer) input takes the same path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from conftest import require_tools
from graphopt import qref
from quant_models import PATTERNS, Residual, calibration, ready

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def _compile_and_compare(qm, target: str):
    ig = graphopt.to_integer(qm, (X,))
    ref = qref.run(ig, (X,))[0]
    cm = graphopt.compile(qm, (X,), target, progress=False, count_instructions=False)
    got = cm(X).numpy()
    assert np.array_equal(got, ref), f"max difference {np.abs(got - ref).max()}"
    return cm


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_on_host_is_bit_identical_to_reference(name):
    qm = graphopt.quantize(ready(PATTERNS[name]()), (X,), calibration=calibration())
    cm = _compile_and_compare(qm, "host")
    fold = next(p for p in cm.report.passes if p.name == "fold-qdq")
    assert fold.modified and fold.stats["folded"] >= 2
    assert cm.report.quantization["weight_bytes"] * 4 == cm.report.quantization["weight_bytes_fp32"]


@pytest.mark.emulation
def test_int4_residual_on_emulated_aarch64_is_bit_identical_to_reference():
    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    qat = graphopt.prepare_qat(ready(Residual()), (X,), scheme=graphopt.QuantScheme(weights=4, activations=8,
                                                                                     keep_first_last_8bit=False))
    with torch.no_grad():
        next(qat.parameters()).mul_(1.01)
    cm = _compile_and_compare(graphopt.convert(qat), "arm")
    q = cm.report.quantization
    assert q["weight_bytes_fp32"] / q["weight_bytes"] == pytest.approx(8.0, rel=0.02)
    assert "int4" in cm.report.to_markdown()


def test_float_model_compiles_with_fold_qdq_as_noop():
    cm = graphopt.compile(ready(Residual()), (X,), "host", progress=False)
    fold = next(p for p in cm.report.passes if p.name == "fold-qdq")
    assert not fold.modified and not fold.declined and cm.report.quantization == {}


def test_pt2e_xnnpack_model_compiles_and_matches_pt2e_within_one_lsb():
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    xnn = pytest.importorskip("torchao.testing.pt2e._xnnpack_quantizer")
    model = ready(PATTERNS["conv_bn_relu"]())
    quantizer = xnn.XNNPACKQuantizer().set_global(xnn.get_symmetric_quantization_config(is_per_channel=True))
    exported = torch.export.export(model, (X,), strict=False).module()
    prepared = pt2e.prepare_pt2e(exported, quantizer)
    for batch in calibration():
        for i in range(len(batch)):  # the exported graph is specialized to the example batch size
            prepared(batch[i:i + 1])
    converted = pt2e.convert_pt2e(prepared)
    want = converted(X)
    cm = graphopt.compile(converted, (X,), "host", progress=False)
    fold = next(p for p in cm.report.passes if p.name == "fold-qdq")
    assert fold.stats.get("conv2d") == 1 and fold.stats.get("linear") == 1
    out_dq = [n for n in converted.graph.nodes if n.op == "output"][0].args[0][0]
    scale = float(out_dq.args[1])
    assert (cm(X) - want).abs().max().item() <= scale * (1 + 1e-4)


def test_relax_fixed_point_formula_equals_reference_gemmlowp():
    import tvm
    from tvm import te

    from graphopt.targets.converters import _mbqm_expr

    rng = np.random.default_rng(0)
    n = 100_000
    acc = np.concatenate([rng.integers(-2 ** 31, 2 ** 31, n // 2), rng.integers(-3000, 3000, n // 2)])
    m0, shift = rng.integers(2 ** 30, 2 ** 31, n), rng.integers(-31, 8, n)
    a, m, s = (te.placeholder((n,), "int64", name=k) for k in "ams")
    out = te.compute((n,), lambda i: _mbqm_expr(a[i], m[i], s[i]))
    f = tvm.compile(te.create_prim_func([a, m, s, out]), target="llvm")
    got = tvm.runtime.tensor(np.zeros(n, np.int64))
    f(*(tvm.runtime.tensor(v.astype(np.int64)) for v in (acc, m0, shift)), got)
    assert np.array_equal(got.numpy(), qref._mbqm(acc, m0, shift))
