"""End-to-end `graphopt.compile`: the zoo on host and emulated aarch64, artifacts, errors, report."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import require_tools
from torch import nn

import graphopt
from graphopt.passes.manager import max_rel_error
from graphopt.zoo import ZOO, Expect, ResidualCNN, ResNet20, recalibrate_bn

RTOL = 1e-4


def _zoo_params() -> list:
    return [pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=True, reason=entry.note)]
                         if entry.expect is not Expect.PASS else [])
            for name, entry in ZOO.items()]


def _check_against_pytorch(cm, model, inputs, trials=2):
    """Outputs within RTOL of PyTorch on the example and on fresh inputs of the same shape."""
    batches = [inputs] + [tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs)
                          for _ in range(trials - 1)]
    for x in batches:
        with torch.no_grad():
            want = model(*x)
        err = max_rel_error(cm(*x), want)
        assert err <= RTOL, f"max error {err:.3g} relative to output scale"


@pytest.mark.parametrize("name", _zoo_params())
def test_zoo_on_host(name):
    model, inputs = ZOO[name].factory()
    cm = graphopt.compile(model, inputs, "host", progress=False)
    _check_against_pytorch(cm, model, inputs)
    assert not cm.report.lowering["unscheduled"], cm.report.lowering


@pytest.mark.emulation
@pytest.mark.parametrize("name", _zoo_params())
def test_zoo_on_emulated_aarch64(name):
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    model, inputs = ZOO[name].factory()
    cm = graphopt.compile(model, inputs, "arm", progress=False, count_instructions=False)
    _check_against_pytorch(cm, model, inputs, trials=1)


@pytest.mark.emulation
def test_arm_artifact_is_self_contained_and_reports_instructions(tmp_path):
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    model, inputs = ZOO["plain_cnn"].factory()
    cm = graphopt.compile(model, inputs, "arm-a53", verify=True, progress=False)
    out = cm.save(tmp_path / "art")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"model.so", "runner", "graphopt_model.h", "manifest.json", "report.json"} <= names
    assert any(n.startswith("lib/libtvm_runtime") for n in names)
    assert "aarch64" in subprocess.run(["file", str(out / "model.so")], capture_output=True, text=True).stdout
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["ran_on"] == "qemu cortex-a53"
    assert report["instructions_per_inference"] and report["instructions_per_inference"] > 100_000
    # a saved artifact reopens and runs on its own
    again = graphopt.CompiledModel.load(out)
    assert max_rel_error(again(*inputs), model(*inputs)) <= RTOL


def test_report_contents_and_stable_json(tmp_path):
    model, inputs = ZOO["plain_cnn"].factory()
    cm = graphopt.compile(model, inputs, "host", verify=True, progress=False)
    r = cm.report
    d = r.to_dict()
    assert d["schema_version"] == 1 and d["target"]["name"] == "host"
    assert d["params"]["before"] > d["params"]["after"] > 0  # BN parameters folded away
    conv_fc_macs = 16 * 28 * 28 * 9 + 32 * 14 * 14 * 16 * 9 + 32 * 7 * 7 * 64 + 64 * 10
    assert d["macs"]["after"] == conv_fc_macs
    assert [p["name"] for p in d["passes"]] == ["inline-regions", "functionalize", "remove-identity",
                                                "fold-batchnorm", "fold-qdq", "dead-code"]
    assert d["passes"][3]["stats"]["folded"] == 2
    assert d["verification"]["max_rel_error"] <= RTOL
    assert d["artifact"]["bytes"] > 0 and "model.so" in d["artifact"]["files"]
    assert set(d["timings_s"]) >= {"capture", "passes", "export", "lower and build"}
    assert json.loads(r.to_json()) == json.loads(json.dumps(d, sort_keys=True, default=str))
    md = r.to_markdown()
    assert "fold-batchnorm" in md and "Declined rewrites (0)" in md
    saved = cm.save(tmp_path / "a")
    assert (saved / "report.md").exists() and (saved / "model.so").exists()


def test_declines_reach_the_report():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 3, padding=1)
            self.b = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.c(x)
            return self.b(y) + y

    cm = graphopt.compile(Shared().eval(), (torch.randn(1, 3, 8, 8),), "host", progress=False)
    (d,) = cm.report.declined
    assert d.pass_name == "fold-batchnorm" and "2 users" in d.reason and "test_compile.py" in d.where
    assert "2 users" in cm.report.to_markdown()


def test_training_mode_compiles_eval_behaviour_with_a_warning_and_restores_mode():
    model, inputs = ZOO["plain_cnn"].factory()
    model.train()
    with pytest.warns(graphopt.GraphoptWarning, match="training mode"):
        cm = graphopt.compile(model, inputs, "host", progress=False)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert max_rel_error(cm(*inputs), model(*inputs)) <= RTOL
    assert cm.report.warnings


def test_unsupported_ops_are_all_listed_with_source_lines_and_nothing_built(tmp_path):
    class Odd(nn.Module):
        def forward(self, x):
            a = torch.nn.functional.adaptive_max_pool2d(x, (2, 2))
            b = torch.fft.rfft2(x).abs()[..., :2, :2]
            return a + b

    with pytest.raises(graphopt.LoweringError) as info:
        graphopt.compile(Odd(), (torch.randn(1, 2, 8, 8),), "host", progress=False)
    err = info.value
    whats = " ".join(i.what for i in err.items)
    assert "adaptive_max_pool2d" in whats and "fft" in whats
    assert all("test_compile.py" in i.where for i in err.items)
    assert "Nothing was built" in str(err)


def test_call_checks_inputs():
    model, inputs = ZOO["residual_cnn"].factory()
    cm = graphopt.compile(model, inputs, "host", progress=False)
    with pytest.raises(graphopt.InputError, match="expected 1 input"):
        cm()
    with pytest.raises(graphopt.InputError, match=r"compiled for shape \[1, 3, 32, 32\] float32"):
        cm(torch.randn(1, 3, 16, 16))
    with pytest.raises(graphopt.InputError, match="float64"):
        cm(torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_host_inputs_are_read_in_place_or_copied_when_misaligned_and_outputs_are_owned():
    model, inputs = ZOO["residual_cnn"].factory()
    cm = graphopt.compile(model, inputs, "host", progress=False)
    x = inputs[0].clone()
    assert x.data_ptr() % 64 == 0  # borrowed without a copy
    shifted = torch.empty(x.numel() + 1)[1:].view(x.shape).copy_(x)  # contiguous, 4 bytes off alignment
    assert shifted.data_ptr() % 64 == 4
    first = cm(x)
    assert torch.equal(cm(shifted), first) and torch.equal(x, inputs[0])  # the input is left as it was
    cm(torch.randn(x.shape))
    with torch.no_grad():
        assert torch.allclose(first, model(x), atol=1e-4)  # a later call does not overwrite an output


def test_host_call_takes_strided_and_grad_inputs_and_runs_from_memory_once_loaded():
    """check_inputs' fast path still copies a strided input and detaches one that requires grad; after
    the first call the library runs from memory, so the deleted folder no longer matters."""
    model, inputs = ZOO["residual_cnn"].factory()
    cm = graphopt.compile(model, inputs, "host", progress=False)
    x = inputs[0]
    first = cm(x)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous() and torch.equal(strided, x)
    assert torch.equal(cm(strided), first)
    assert torch.equal(cm(x.clone().requires_grad_()), first)
    import shutil

    shutil.rmtree(cm.build_dir)
    assert torch.equal(cm(x), first)


class _Bfloat16Boundary(nn.Module):
    """bfloat16 in and out (torch cannot hand bfloat16 to numpy; graphopt passes it as ml_dtypes')."""

    def forward(self, x, h):
        return (x.float() * 3 + h).to(torch.bfloat16), x * 2


@pytest.mark.parametrize("target", ["host", pytest.param("arm", marks=pytest.mark.emulation)])
def test_bfloat16_inputs_and_outputs_round_trip(target):
    if target == "arm":
        require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    model = _Bfloat16Boundary().eval()
    torch.manual_seed(0)
    x, h = torch.randn(2, 5).to(torch.bfloat16), torch.randn(2, 5)
    cm = graphopt.compile(model, (x, h), target, progress=False, count_instructions=False)
    for _ in range(2):  # bit-exact: the same float32 arithmetic and round-to-nearest-even casts
        got, want = cm(x, h), model(x, h)
        assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        x, h = torch.randn(2, 5).to(torch.bfloat16), torch.randn(2, 5)


def test_resnet20_benchmark_model_on_host():
    """The CIFAR ResNet-20 of benchmarks/peers.py: 19 3x3 convs (16/32/64 channels), two 1x1 projections
    and a Linear, compiled within RTOL of PyTorch."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    model = recalibrate_bn(ResNet20(), (x,))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 21 and sum(c.kernel_size == (1, 1) for c in convs) == 2
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    cm = graphopt.compile(model, (x,), "host", progress=False)
    _check_against_pytorch(cm, model, (x,))


def test_unknown_target_fails_before_any_work():
    with pytest.raises(graphopt.UnknownTargetError, match="arm-a53"):
        graphopt.compile(ResidualCNN(), (torch.randn(1, 3, 32, 32),), "riscv-9000", progress=False)


def test_cli_compile_writes_artifact_and_refuses_unwritable_output(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "graphopt.cli", "compile", "graphopt.zoo:plain_cnn", "--target", "host",
           "--json", "--quiet", "--verify"]
    ok = subprocess.run(cmd + ["--out", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["verification"]["max_rel_error"] <= RTOL
    assert (tmp_path / "out" / "model.so").exists()

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    bad = subprocess.run(cmd + ["--out", str(blocker / "out")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Nothing was written" in bad.stderr
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]  # no stray partial folders


def test_save_replaces_atomically_and_leaves_nothing_on_failure(tmp_path):
    model, inputs = ZOO["plain_cnn"].factory()
    cm = graphopt.compile(model, inputs, "host", progress=False)
    dst = tmp_path / "art"
    cm.save(dst)
    first = (dst / "model.so").stat().st_ino
    cm.save(dst)  # replaced as a whole
    assert (dst / "model.so").stat().st_ino != first
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    with pytest.raises(graphopt.ArtifactError):
        cm.save(dst / "model.so" / "x")
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
