"""Capture paths and errors, the target registry, the report, and the CLI's argument handling."""
import dataclasses
import json

import pytest
import torch
from torch import nn

from graphopt.errors import CaptureError, ConfigError, InputError, UnknownTargetError
from graphopt.passes.capture import CaptureMethod, capture
from graphopt.targets import (
    Feature,
    Runtime,
    TargetSpec,
    get_target,
    list_targets,
    register_target,
)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python branch: neither tracer can capture this
            return x * 2
        return x - 1


@pytest.mark.parametrize("method", [CaptureMethod.EXPORT, CaptureMethod.SYMBOLIC_TRACE])
def test_capture_methods_give_one_aten_form_with_same_outputs(method):
    model, x = Small().eval(), (torch.randn(2, 3, 8, 8),)
    c = capture(model, x, method)
    assert c.method is method
    ops = {n.target for n in c.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.conv2d.default in ops and torch.ops.aten.linear.default in ops
    assert not [n for n in c.graph_module.graph.nodes if n.op == "call_module"]
    for _ in range(3):
        xi = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(c.graph_module(xi), model(xi), rtol=0, atol=0)


def test_auto_capture_falls_back_to_symbolic_trace_and_says_why(monkeypatch):
    real_export = torch.export.export

    def export_refusing_the_user_class(mod, *a, **k):
        if type(mod) is Small:
            raise RuntimeError("simulated torch.export failure")
        return real_export(mod, *a, **k)

    monkeypatch.setattr(torch.export, "export", export_refusing_the_user_class)
    c = capture(Small().eval(), (torch.randn(1, 3, 8, 8),))
    assert c.method is CaptureMethod.SYMBOLIC_TRACE
    assert "simulated torch.export failure" in c.fallback_reason


def test_untraceable_model_lists_both_attempts_with_the_user_line():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(3),))
    err = info.value
    assert len(err.items) == 2
    assert {i.what.split(":")[0] for i in err.items} == {"torch.export", "fx.symbolic_trace"}
    assert all("test_capture_targets.py" in i.where and "x.sum() > 0" in i.where for i in err.items)
    assert "torch.where" in str(err)


@pytest.mark.parametrize("bad, match", [
    ((), "non-empty tuple"),
    ((torch.randn(2, 3, 8, 8), torch.randn(1)), "model raised on the example inputs"),
    ((torch.randn(2, 5, 8, 8),), r"\[\(\(2, 5, 8, 8\)"),
    ((3.0,), "not tensors"),
])
def test_bad_example_inputs_are_input_errors(bad, match):
    with pytest.raises(InputError, match=match):
        capture(Small().eval(), bad)


def test_registry_resolves_aliases_and_lists_known_names_on_error():
    assert get_target("arm").name == "arm-a72"
    assert get_target("arm-a55").has(Feature.DOTPROD)
    assert get_target("arm-a76").has(Feature.I8MM)
    assert not get_target("arm-a53").has(Feature.DOTPROD)
    host = get_target("host")
    assert host.runtime is Runtime.TVM_VM_NATIVE and host.tvm_target["mcpu"] not in ("", "generic")
    with pytest.raises(UnknownTargetError) as info:
        get_target("cortex-a9000")
    for name in ("arm-a53", "arm-a55", "arm-a72", "arm-a76", "host", "arm (= arm-a72)"):
        assert name in str(info.value)
    assert {t.name for t in list_targets()} >= {"host", "arm-a53", "arm-a55", "arm-a72", "arm-a76"}


def test_target_specs_validate_themselves_and_register_without_registry_changes():
    with pytest.raises(ConfigError, match="pinned CPU"):
        TargetSpec(name="bad", description="", tvm_target={"kind": "llvm"}, runtime=Runtime.TVM_VM_QEMU_USER)
    with pytest.raises(ConfigError, match="unknown features"):
        TargetSpec(name="bad", description="", tvm_target={"kind": "llvm"}, runtime=Runtime.TVM_VM_NATIVE,
                   features={"avx9"})
    spec = TargetSpec(name="test-m4", description="bare-metal board", runtime=Runtime.C_LIBRARY_QEMU_SYSTEM,
                      tvm_target={"kind": "c"}, features={Feature.DSP}, qemu_binary="qemu-system-arm",
                      qemu_machine="mps2-an386", vector_bits=32, aliases=("my-board",))
    register_target(spec)
    assert get_target("my-board") is spec
    with pytest.raises(ConfigError, match="already"):
        register_target(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"


def test_cli_targets_json_and_bad_factory(capsys):
    from graphopt.cli import main

    assert main(["targets", "--json"]) == 0
    names = {t["name"] for t in json.loads(capsys.readouterr().out)}
    assert {"host", "arm-a72"} <= names
    assert main(["compile", "no_colon_here", "--out", "/tmp/x"]) == 2
    assert "pkg.module:factory" in capsys.readouterr().err
    assert main(["compile", "graphopt.zoo:nope", "--target", "host", "--out", "/tmp/x"]) == 2
    assert main(["compile", "graphopt.zoo:plain_cnn", "--target", "nope", "--out", "/tmp/x"]) == 2
    assert "Known targets" in capsys.readouterr().err
