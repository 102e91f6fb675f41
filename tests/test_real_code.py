"""The real-code zoo (`graphopt.zoo.REAL_CODE`): models written as their upstream sources are, each
held to its recorded outcome torch-mlir style — an unexpected failure and an unexpected pass both
fail. Graph checks (fp32 MACs, fp32 ops left in the int8 graph, int8 MACs) need no build; compile
checks build for host and emulated aarch64 (fp32 within 1e-4 of eager, int8 bit-exact to the folded
integer fx graph). A representative subset runs by default, the full sweep is marked slow."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import IN_CI, require_tools

import graphopt
from graphopt.analysis import analyze, float_ops_in_quantized
from graphopt.capture import capture
from graphopt.passes.base import PassContext, Property
from graphopt.pipeline import PassManager, default_passes, max_rel_error
from graphopt.zoo import REAL_CODE, Check

GRAPH_DEFAULT = {"tv_resnet18", "tv_mobilenet_v3_small", "pcv_resnet20_cifar10"}
COMPILE_DEFAULT = {("tv_resnet18", "host")}  # channel shuffle and attention compile in test_semantics
INT8_COMPILE_DEFAULT = {(m, t) for m in ("tv_resnet18", "tv_mobilenet_v3_small") for t in ("host", "arm")}
TARGETS = ("host", "arm")


def _require(packages) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        if IN_CI:
            pytest.fail(f"CI is missing {missing}; scripts/setup.sh must install them")
        pytest.skip(f"needs {missing} (run scripts/setup.sh)")


def _params(checks=None, default=frozenset(), targets=None):
    """pytest params over the zoo (× targets): slow unless in ``default``; strict xfail when the
    entry records the check as failing today."""
    out = []
    for name, entry in REAL_CODE.items():
        for target in targets or (None,):
            key = name if target is None else (name, target)
            check = checks(target) if checks else None
            marks = [] if key in default else [pytest.mark.slow]
            if target == "arm":
                marks.append(pytest.mark.emulation)
            if check is not None and check in entry.fails:
                marks.append(pytest.mark.xfail(strict=True, reason=f"{check.value} is recorded as failing today "
                                                                          f"{entry.note}".strip()))
            out.append(pytest.param(*((name,) if target is None else (name, target)), marks=marks,
                                    id=name if target is None else f"{name}-{target}"))
    return out


_cache: dict = {}


def _folded(model, args):
    """What compile lowers for host/arm: the captured graph after the default passes."""
    c = capture(model, args)
    ctx = PassContext(args, None, {Property.ATEN, Property.INFERENCE} | c.properties)
    return PassManager(default_passes()).run(c.graph_module, ctx)[0]


def _calibration(args) -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(a.shape, generator=g) if a.is_floating_point() else a for a in args)
            for _ in range(2)] + [args]


def _model(name):
    entry = REAL_CODE[name]
    _require(entry.needs)
    if name not in _cache:
        _cache[name] = entry.factory()
    return _cache[name]


def _int8(name):
    """(quantized module, its folded integer graph), once per session."""
    key = ("int8", name)
    if key not in _cache:
        model, args = _model(name)
        qm = graphopt.quantize(model, args, calibration=_calibration(args))
        _cache[key] = qm, _folded(qm, args)
    return _cache[key]


@pytest.mark.parametrize("name", _params(default=GRAPH_DEFAULT))
def test_fp32_macs_after_passes(name):
    model, args = _model(name)
    macs = analyze(_folded(model, args), args).macs
    assert macs == REAL_CODE[name].macs, f"{name}: MACs after the passes are {macs}; update its macs to {macs}"


@pytest.mark.parametrize("name", _params(default=GRAPH_DEFAULT))
def test_int8_graph_float_ops(name):
    """fp32 ops left between quantize and dequantize: 0 for every CNN; where not, the entry's note
    says why and the compile report lists each as a declined rewrite with its reason."""
    _, args = _model(name)
    _, ig = _int8(name)
    ops = float_ops_in_quantized(ig, args)
    n = sum(ops.values())
    entry = REAL_CODE[name]
    assert n == entry.float_ops, f"{name}: {n} fp32 op(s) left between quantize and dequantize {ops}; update float_ops"
    assert not n or entry.note, f"{name}: {ops} left in fp32; its entry must say why"


@pytest.mark.parametrize("name", _params(lambda _: Check.INT8_MACS, default=GRAPH_DEFAULT))
def test_int8_graph_reports_true_macs(name):
    """The integer graph's ops state their MACs (graphopt.qops): the fp32 graph's, plus the
    multiplies of per-channel integer affines where a BatchNorm stands alone."""
    _, args = _model(name)
    _, ig = _int8(name)
    entry = REAL_CODE[name]
    macs = analyze(ig, args).macs
    assert macs == (entry.int8_macs or entry.macs), f"{name}: the int8 graph reports {macs} MACs; update int8_macs"


def _compile(model, args, target):
    if target == "arm":
        require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    return graphopt.compile(model, args, target, progress=False, count_instructions=False)


@pytest.mark.parametrize("name,target", _params(lambda t: Check(f"fp32-{t}"), COMPILE_DEFAULT, TARGETS))
def test_fp32_compile_matches_eager(name, target):
    model, args = _model(name)
    cm = _compile(model, args, target)
    for x in _calibration(args)[-2:]:
        with torch.no_grad():
            want = model(*x)
        err = max_rel_error(cm(*x), want)
        assert err <= 1e-4, f"{name} on {target}: max error {err:.3g} relative to output scale"
    assert cm.report.macs_after == REAL_CODE[name].macs


@pytest.mark.parametrize("name,target", _params(lambda t: Check(f"int8-{t}"), INT8_COMPILE_DEFAULT, TARGETS))
def test_int8_compile_is_bit_exact_to_the_integer_graph(name, target):
    """The artifact equals the folded integer graph, and its report gives the fp32 ops left and the
    integer graph's MACs."""
    _, args = _model(name)
    qm, ig = _int8(name)
    cm = _compile(qm, args, target)
    for x in _calibration(args)[-2:]:
        with torch.no_grad():
            want = ig(*x)
        got = cm(*x)
        assert torch.equal(got, want), f"{name} on {target}: max difference {float((got - want).abs().max())}"
    entry = REAL_CODE[name]
    assert cm.report.quantization["float_ops"] == entry.float_ops
    assert cm.report.macs_after == (entry.int8_macs or entry.macs)
