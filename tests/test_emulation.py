"""aarch64 emulation: toolchain lookup, runtime harvest, the C++ runner, packaging, QEMU runs,
instruction counting. Models are built here (torch.export -> Relax -> cross-compiled .so), so
these tests do not depend on graphopt's lowering. QEMU tests are marked `emulation`; a missing
tool skips them outside CI and fails them in CI."""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import IN_CI, require_tools

from graphopt.errors import ArtifactError, ConfigError, InputError, ToolchainError
from graphopt.targets import get_target
from graphopt.targets.backends import emulation as emu
from graphopt.targets.backends import toolchain

SPEC = get_target("arm-a53")
TVM_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53", "mattr": ["+neon"]}


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI must provide it: scripts/setup.sh)")
    pytest.skip(reason)


# --------------------------------------------------------------------------- no QEMU needed

def test_require_tool_names_the_apt_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ToolchainError, match="apt-get install qemu-user"):
        toolchain.require_tool("qemu-aarch64")


def test_runtime_dir_missing_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHOPT_HOME", str(tmp_path))
    with pytest.raises(ToolchainError, match="graphopt setup-runtime"):
        toolchain.runtime_dir("aarch64")


def test_stale_runtime_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHOPT_HOME", str(tmp_path))
    stale = tmp_path / "runtime" / "aarch64"
    stale.mkdir(parents=True)
    (stale / "graphopt-runtime.json").write_text(json.dumps({"versions": {"apache-tvm": "0.1"}}))
    with pytest.raises(ToolchainError, match="missing or stale"):
        toolchain.runtime_dir("aarch64")


def test_runtime_refuses_arch_without_wheels():
    with pytest.raises(ConfigError, match="runtime-free C path"):
        toolchain.ensure_runtime("armv7")


def test_emulation_refuses_native_targets(tmp_path):
    with pytest.raises(ConfigError, match="not as a TVM VM library"):
        emu.run_emulated(tmp_path, get_target("host"), [])


def test_deb_src_entries_mirror_binary_entries():
    one_line, deb822 = toolchain._deb_src_entries()
    text = one_line + deb822
    assert "deb-src" in text and "Types: deb\n" not in text


def test_header_compiles_and_describes_tensors(tmp_path):
    require_tools("gcc")
    h = emu.write_header(tmp_path / "graphopt_model.h",
                         [{"name": "image", "shape": [1, 3, 8, 8], "dtype": "float32"},
                          {"name": "tokens", "shape": ["batch", 16], "dtype": "int64"}],
                         [{"name": "logits", "shape": [1, 10], "dtype": "torch.int8"}], SPEC)
    text = h.read_text()
    assert '{"image", "float32", 4, {1, 3, 8, 8}, 768}' in text
    assert '{"tokens", "int64", 2, {-1, 16}, -1}' in text
    assert "#define GRAPHOPT_OUTPUT_0_NBYTES 10" in text
    (tmp_path / "main.c").write_text('#include "graphopt_model.h"\n'
                                     "int main(void) { return graphopt_inputs[0].nbytes == 768 ? 0 : 1; }\n")
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", "-o", str(tmp_path / "m"), str(tmp_path / "main.c")],
                   check=True, cwd=tmp_path)
    assert subprocess.run([str(tmp_path / "m")]).returncode == 0


# --------------------------------------------------------------------------- models and artifacts

class TwoInTwoOut(torch.nn.Module):
    """CNN branch + vector branch; returns (tensor, (tensor, scalar)) to exercise tuple flattening."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x, bias):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3))
        logits = self.fc(h) + bias
        return logits, (h * 2.0, logits.sum())


class IntModel(torch.nn.Module):
    """int8 and int32 inputs; int32, int64 and float32 outputs."""

    def forward(self, q, w):
        acc = q.to(torch.int32) * w + 3
        return acc, torch.argmax(acc, dim=1), q.to(torch.float32) * 0.5


def _compile(model: torch.nn.Module, example: tuple, out_dir):
    import tvm
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.support import cc

    ep = torch.export.export(model, example)
    mod = from_exported_program(ep, keep_params_as_input=False)
    ex = tvm.compile(mod, target=tvm.target.Target(TVM_TARGET))
    so = out_dir / "model.so"
    ex.export_library(str(so), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    return so


def _specs(tensors, prefix):
    return [{"name": f"{prefix}{i}", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for i, t in enumerate(tensors)]


def _flat(out):
    return [t for o in out for t in (_flat(o) if isinstance(o, tuple) else [o])]


@pytest.fixture(scope="module")
def arm_runtime():
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    try:
        return toolchain.ensure_runtime()
    except ToolchainError as e:
        _unavailable(f"cannot harvest the aarch64 TVM runtime: {e}")


def _artifact(model, example, tmp_path_factory, name):
    work = tmp_path_factory.mktemp(name)
    with torch.no_grad():
        ref = [t.numpy() for t in _flat(model(*example))]
    so = _compile(model, example, work)
    art = emu.package_arm_artifact(so, SPEC, _specs(example, "in"), _specs(_flat(model(*example)), "out"),
                                   work / "artifact")
    return art, [t.numpy() for t in example], ref


@pytest.fixture(scope="module")
def cnn_artifact(arm_runtime, tmp_path_factory):
    torch.manual_seed(0)
    example = (torch.randn(1, 3, 32, 32), torch.randn(1, 10))
    return _artifact(TwoInTwoOut().eval(), example, tmp_path_factory, "cnn")


@pytest.fixture(scope="module")
def int_artifact(arm_runtime, tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    example = (torch.randint(-128, 128, (2, 8), dtype=torch.int8, generator=g),
               torch.randint(-1000, 1000, (2, 8), dtype=torch.int32, generator=g))
    return _artifact(IntModel().eval(), example, tmp_path_factory, "int")


# --------------------------------------------------------------------------- QEMU runs

@pytest.mark.emulation
def test_artifact_layout(cnn_artifact):
    art, _, _ = cnn_artifact
    for f in ("model.so", "runner", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "graphopt_model.h", "manifest.json"):
        assert (art / f).is_file(), f
    manifest = json.loads((art / "manifest.json").read_text())
    assert [e["name"] for e in manifest["inputs"]] == ["in0", "in1"]
    assert manifest["qemu"]["cpu"] == "cortex-a53"


@pytest.mark.emulation
def test_multi_input_multi_output_matches_torch(cnn_artifact):
    art, inputs, ref = cnn_artifact
    run = emu.run_emulated(art, SPEC, inputs, repeat=2)
    assert len(run.outputs) == len(ref) == 3
    for got, want in zip(run.outputs, ref, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= 1e-4 * scale
    assert run.instructions_per_inference is None and run.wall_seconds > 0
    assert run.emulated_ms_per_inference is not None


@pytest.mark.emulation
def test_integer_dtypes_are_exact(int_artifact):
    art, inputs, ref = int_artifact
    assert [a.dtype.name for a in inputs] == ["int8", "int32"]
    run = emu.run_emulated(art, SPEC, inputs)
    assert [o.dtype.name for o in run.outputs] == ["int32", "int64", "float32"]
    for got, want in zip(run.outputs, ref, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.emulation
def test_deployed_folder_is_self_contained(cnn_artifact, tmp_path):
    """The folder runs from anywhere with the manifest, as it would on a board."""
    art, inputs, ref = cnn_artifact
    moved = shutil.copytree(art, tmp_path / "deployed")
    for i, a in enumerate(inputs):
        a.tofile(moved / f"in{i}.bin")
    proc = subprocess.run(["qemu-aarch64", "-cpu", "cortex-a53", "-L", "/usr/aarch64-linux-gnu", "./runner",
                           "model.so", "--manifest", "manifest.json", "in0.bin", "in1.bin"],
                          cwd=moved, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "output 0 dtype=float32 shape=1,10" in proc.stdout
    got = np.fromfile(moved / "output_0.bin", dtype=np.float32).reshape(1, 10)
    assert np.abs(got - ref[0]).max() <= 1e-4 * max(1.0, float(np.abs(ref[0]).max()))


@pytest.mark.emulation
def test_runner_reports_bad_input_file(cnn_artifact, tmp_path):
    art, inputs, _ = cnn_artifact
    inputs[0][:, :, :16].tofile(tmp_path / "short.bin")
    proc = subprocess.run(["qemu-aarch64", "-cpu", "cortex-a53", "-L", "/usr/aarch64-linux-gnu", str(art / "runner"),
                           str(art / "model.so"), "--input", f"{tmp_path / 'short.bin'}:float32:1,3,32,32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3
    assert "expected 12288 for float32[1,3,32,32]" in proc.stderr


@pytest.mark.emulation
def test_inputs_are_checked_against_the_manifest(cnn_artifact):
    art, inputs, _ = cnn_artifact
    with pytest.raises(InputError, match="takes 2 inputs"):
        emu.run_emulated(art, SPEC, inputs[:1])
    with pytest.raises(InputError, match="wants float32"):
        emu.run_emulated(art, SPEC, [inputs[0].astype(np.float64), inputs[1]])


@pytest.mark.emulation
def test_bogus_model_fails_with_the_runner_message(arm_runtime, tmp_path):
    (tmp_path / "model.so").write_bytes(b"not an ELF file")
    with pytest.raises(ToolchainError, match="model load error"):
        emu.run_emulated(tmp_path, SPEC, [np.zeros((1, 4), np.float32)], timeout=120)


def test_missing_model_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no model.so"):
        emu.run_emulated(tmp_path, SPEC, [])


@pytest.mark.emulation
def test_hung_run_is_killed_at_the_timeout(cnn_artifact):
    art, inputs, _ = cnn_artifact
    start = time.monotonic()
    with pytest.raises(ToolchainError, match="did not finish within 2 s"):
        emu.run_emulated(art, SPEC, inputs, repeat=10**7, timeout=2)
    assert time.monotonic() - start < 30
    leftover = subprocess.run(["pgrep", "-f", f"{art}/runner"], capture_output=True, text=True).stdout
    assert leftover == ""


@pytest.mark.emulation
def test_instruction_count_is_positive_and_stable(cnn_artifact):
    art, inputs, ref = cnn_artifact
    runs = [emu.run_emulated(art, SPEC, inputs, repeat=k, count_instructions=True) for k in (2, 4)]
    if runs[0].instructions_unavailable:
        _unavailable(runs[0].instructions_unavailable)
    a, b = (r.instructions_per_inference for r in runs)
    assert a > 100_000 and b > 100_000
    assert abs(a - b) / max(a, b) < 0.01, (a, b)
    assert np.abs(runs[0].outputs[0] - ref[0]).max() <= 1e-4 * max(1.0, float(np.abs(ref[0]).max()))


def test_counting_refuses_several_threads(tmp_path):
    with pytest.raises(ConfigError, match="threads=1"):
        emu.run_emulated(tmp_path, SPEC, [], count_instructions=True, threads=2)
