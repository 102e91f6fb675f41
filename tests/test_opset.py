"""Operator sets: the data model, the Cortex-M set, `graphopt targets --ops`, a user-registered tiny
target (conv3×3, ReLU, add, linear) that accepts a rewritable model and refuses one that is not, the
`graphopt.check` dry run, and the foundation zoo models on cortex-m4 with approximations reported."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import require_tools
from torch import nn
from torch.nn import functional as F

import graphopt
from graphopt import cli, zoo
from graphopt.errors import ConfigError
from graphopt.targets import Runtime, TargetSpec, register_target
from graphopt.targets.opset import EVERYTHING, OperatorSet, OpRule

DSP = TargetSpec(
    name="camera-dsp", description="test camera DSP: 3×3 conv, ReLU, add, linear", tvm_target={"kind": "llvm"},
    runtime=Runtime.TVM_VM_NATIVE, ops=OperatorSet("camera-dsp", (
        OpRule("conv2d", kernel_sizes={3}, depthwise=False, grouped=False, dilation=False),
        OpRule("relu"), OpRule("add"), OpRule("linear")), dtypes={"float32"}))
register_target(DSP, replace=True)


def test_operator_set_refuses_malformed_definitions():
    with pytest.raises(ConfigError, match="listed twice"):
        OperatorSet("x", (OpRule("relu"), OpRule("relu")))
    with pytest.raises(ConfigError, match="unknown dtype"):
        OperatorSet("x", (OpRule("relu"),), dtypes={"float33"})
    with pytest.raises(ConfigError, match="kernel_sizes"):
        OpRule("conv2d", kernel_sizes={(3, 0)})
    with pytest.raises(ConfigError, match="max_rank"):
        OperatorSet("x", (), max_rank=0)
    with pytest.raises(ConfigError, match="ops must be"):
        TargetSpec(name="bad-ops", description="", tvm_target={"kind": "llvm"}, runtime=Runtime.TVM_VM_NATIVE,
                   ops=("conv2d",))


def test_targets_carry_operator_sets():
    m4 = graphopt.get_target("cortex-m4")
    assert graphopt.get_target("host").ops is EVERYTHING and graphopt.get_target("arm").ops.unrestricted
    assert graphopt.get_target("m7").ops == m4.ops and not m4.ops.unrestricted
    assert m4.ops.rule("gelu") is None and m4.ops.rule("tanh") is None and m4.ops.rule("layer_norm") is None
    conv = m4.ops.rule("conv2d")
    assert conv.depthwise and not conv.grouped and not conv.dilation
    assert "float64" not in m4.ops.dtypes and m4.ops.max_rank == 4
    assert m4.to_dict()["ops"]["name"] == "mcu"


def test_cli_prints_the_operator_set(capsys):
    assert cli.main(["targets", "--ops", "m4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mcu:") and "conv2d" in out and "grouped no" in out and "qlut" in out
    assert "\n  gelu" not in out
    assert cli.main(["targets", "--ops", "cortex-m4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["kind"] for r in data["rules"]} >= {"conv2d", "linear", "clamp"} and data["max_rank"] == 4
    assert cli.main(["targets", "--ops", "host"]) == 0
    assert "no restrictions" in capsys.readouterr().out


class Fits(nn.Module):
    """Runs on the camera DSP after exact rewrites: grouped conv, 1×1 conv, avg-pool, BN (folded)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv1(x)))
        y = torch.relu(self.grouped(y)) + self.pointwise(y)
        return self.fc(torch.flatten(F.avg_pool2d(y, 3, 1, 1), 1))


class DoesNotFit(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv5 = nn.Conv2d(3, 8, 5, padding=2)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.sigmoid(self.conv5(x))
        y = self.norm(F.max_pool2d(y, 2))
        return self.fc(torch.flatten(y, 1))


def test_tiny_target_accepts_a_rewritable_model_and_matches_pytorch():
    model = zoo.recalibrate_bn(Fits(), (torch.randn(1, 3, 8, 8),))
    x = torch.randn(1, 3, 8, 8)
    cm = graphopt.compile(model, (x,), "camera-dsp", progress=False, verify=True)
    rewrites = {r["rewrite"] for r in cm.report.legalized}
    assert rewrites == {"grouped conv → split convs + cat", "1×1 conv → linear", "avg-pool → depthwise conv"}
    assert all(r["exact"] and "test_opset.py" in r["where"] for r in cm.report.legalized)
    assert cm.report.verification["max_rel_error"] < 1e-5
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
    md = cm.report.to_markdown()
    assert "## Legalized for the camera-dsp operator set" in md and "1×1 conv → linear" in md
    assert cm.report.to_dict()["legalized"] == cm.report.legalized


def test_tiny_target_refuses_before_building_and_lists_every_node(monkeypatch):
    monkeypatch.setattr(graphopt.api, "backend_for", lambda spec: pytest.fail("a refused model reached the build"))
    with pytest.raises(graphopt.OperatorSetError) as info:
        graphopt.compile(DoesNotFit().eval(), (torch.randn(1, 3, 8, 8),), "camera-dsp", approximate=True,
                         progress=False)
    err = info.value
    assert isinstance(err, graphopt.UnsupportedModelError)
    by_kind = {i.what.split(":")[0].rstrip("_0123456789"): i for i in err.items}
    assert set(by_kind) == {"conv2d", "sigmoid", "max_pool2d", "layer_norm"}, str(err)
    assert all("test_opset.py" in i.where for i in err.items)
    assert "5×5 kernel" in by_kind["conv2d"].what
    assert "needs" in by_kind["sigmoid"].hint and "mul" in by_kind["sigmoid"].hint
    assert "layer norm" in by_kind["layer_norm"].hint and "rsqrt" in by_kind["layer_norm"].hint
    assert "Nothing was built" in str(err) and "graphopt targets --ops camera-dsp" in str(err)


def test_check_is_a_readable_dry_run():
    model = DoesNotFit().train()
    with pytest.warns(graphopt.GraphoptWarning):
        result = graphopt.check(model, (torch.randn(1, 3, 8, 8),), target="camera-dsp")
    assert model.training and not result.fits and len(result.unsupported) == 4
    text = str(result)
    assert "does NOT fit (4 node(s))" in text and "cannot run (4):" in text and "test_opset.py" in text
    assert json.loads(json.dumps(result.to_dict()))["fits"] is False
    ok = graphopt.check(Fits().eval(), (torch.randn(1, 3, 8, 8),), target="camera-dsp")
    assert ok.fits and set(ok.kinds) <= {"conv2d", "relu", "add", "linear"} and "would change (" in str(ok)


FOUNDATION = list(zoo.ZOO)


@pytest.mark.parametrize("name", FOUNDATION)
def test_foundation_models_fit_cortex_m4(name):
    entry = zoo.ZOO[name]
    for pkg in entry.needs:
        pytest.importorskip(pkg)
    model, inputs = entry.factory()
    strict = graphopt.check(model, inputs, target="cortex-m4")
    if name != "hf_bert_tiny":
        assert strict.fits and not strict.approximations, str(strict)
        return
    # erf-GELU ×2 and the pooler's tanh need approximations
    assert {u.what.split(":")[0] for u in strict.unsupported} == {"gelu", "gelu_1", "tanh"}, str(strict)
    result = graphopt.check(model, inputs, target="cortex-m4", approximate=True)
    assert result.fits, str(result)
    assert {r["node"] for r in result.approximations} == {"gelu", "gelu_1", "tanh"}
    assert all(0 < r["max_error"] <= 2e-6 for r in result.approximations)


_compiled: dict = {}


def _compile_m4(name: str):
    if name not in _compiled:
        entry = zoo.ZOO[name]
        for pkg in entry.needs:
            pytest.importorskip(pkg)
        model, inputs = entry.factory()
        _compiled[name] = (graphopt.compile(model, inputs, "cortex-m4", approximate=True, progress=False,
                                            count_instructions=False), model, inputs)
    return _compiled[name]


@pytest.mark.parametrize("name,rewrite", [("tiny_transformer", "layer norm → mean, sub, mul, rsqrt, add"),
                                          ("mobilenet_blocks", "grouped conv → split convs + cat")])
def test_zoo_compiles_for_cortex_m4_with_legalizations_reported(name, rewrite):
    require_tools("arm-none-eabi-gcc")
    cm, _, _ = _compile_m4(name)
    assert rewrite in {r["rewrite"] for r in cm.report.legalized}
    assert "## Legalized for the mcu operator set" in cm.report.to_markdown()


@pytest.mark.emulation
@pytest.mark.parametrize("name", ["tiny_transformer", "mobilenet_blocks",
                                  pytest.param("hf_bert_tiny", marks=pytest.mark.slow)])
def test_legalized_zoo_model_matches_pytorch_under_qemu(name):
    require_tools("arm-none-eabi-gcc", "qemu-system-arm")
    cm, model, inputs = _compile_m4(name)
    with torch.no_grad():
        want = model(*inputs)
    got = cm(*inputs)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    if name == "hf_bert_tiny":
        assert {r["node"] for r in cm.report.legalized if not r["exact"]} == {"gelu", "gelu_1", "tanh"}
