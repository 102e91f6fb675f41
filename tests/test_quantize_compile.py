"""Quantized models through graphopt.compile: folded integer kernels on host and emulated aarch64 are
bit-identical to the numpy reference; PT2E (torchao XNNPACK quantizer) input takes the same path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_tools
from quant_models import PATTERNS, Residual, calibration, ready

import graphopt
from graphopt import qref

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


def _relax_fixed_point_multiply(acc, m0, shift, bound=None):
    import tvm
    from tvm import relax

    from graphopt.targets.lowering.converters import _constants_along, _fixed_point_multiply

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(acc.shape, "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(_fixed_point_multiply(type("Importer", (), {"block_builder": bb}), x, m0, shift,
                                                     _constants_along(2, 0), bound))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(acc.astype(np.int32))).numpy()


def test_relax_fixed_point_multiply_equals_reference_gemmlowp():
    """The converters' int32 form (one 64-bit product, floor shift) against qref's textbook gemmlowp,
    per channel, over the whole int32 range and the ties, left and right shifts."""
    rng = np.random.default_rng(0)
    channels, n = 64, 4000
    acc = np.concatenate([rng.integers(-2 ** 31, 2 ** 31, (channels, n // 2)),
                          rng.integers(-3000, 3000, (channels, n // 2 - 4)),
                          np.tile([-2 ** 31, 2 ** 31 - 1, -(2 ** 30), 2 ** 30], (channels, 1))], axis=1)
    m0, shift = rng.integers(2 ** 30, 2 ** 31, channels), rng.integers(-31, 8, channels)
    want = qref._mbqm(acc.astype(np.int64), m0[:, None], shift[:, None])
    assert np.array_equal(_relax_fixed_point_multiply(acc, m0, shift), want)


@pytest.mark.parametrize("bound,shifts", [(2 ** 30 - 1, (-31, 0)), (2 ** 22, (-31, 8)), (2 ** 22, (-31, 1))])
def test_relax_fixed_point_multiply_bounded_form(bound, shifts):
    """With |acc| ≤ bound known (the doubled product and the 3-op rounding shift; the general
    rounding where some channel shifts left or not at all) the same values as gemmlowp, edges included."""
    rng = np.random.default_rng(1)
    channels, n = 64, 3000
    acc = np.concatenate([rng.integers(-bound, bound + 1, (channels, n - 6)),
                          rng.integers(-40, 40, (channels, 2)),
                          np.tile([-bound, bound, -(bound // 2), bound // 2], (channels, 1))], axis=1)
    m0, shift = rng.integers(2 ** 30, 2 ** 31, channels), rng.integers(*shifts, channels)
    shift[:2] = shifts[0], shifts[1] - 1
    want = qref._mbqm(acc.astype(np.int64), m0[:, None], shift[:, None])
    assert np.array_equal(_relax_fixed_point_multiply(acc, m0, shift, bound), want)
