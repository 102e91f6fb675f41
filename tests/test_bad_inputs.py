"""Bad input, as a new user gives it: every case raises graphopt's own error, the message names the
fix, and nothing is written or deleted (issue 15, part 4 and 5).

`CASES` is the table: one `Case` per bad input, run by the single parametrized `test_bad_input`.
A case is either an API call (``call(work)`` must raise ``error``) or a command line (``argv``:
``graphopt ARGV`` run in the scratch folder must exit 2 with one ``graphopt: error:`` line and no
traceback; its subcommand must raise ``error``). ``fix`` is a regular expression the message must
match: the phrase that tells the user what to do. Every case runs in a fresh scratch folder that is
also the current folder and ``$TMPDIR``; the folder is snapshotted before and after, and must not
change.

Also here: paths with ``,`` ``'`` ``"`` space and ``$`` reach every tool intact (`test_tmpdir_*`).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import require_tools
from torch import nn

import graphopt
from graphopt.cli import build_parser, main
from graphopt.targets.tuning_db import TuningDatabaseError

X = torch.randn(1, 3, 8, 8)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


class _Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("the user's forward is broken")


class _ReturnsNone(nn.Module):
    def forward(self, x):
        x.sum()


class _Spy(nn.Module):
    """Counts forward calls: a refusal that must come before any model work leaves it at 0."""

    def __init__(self):
        super().__init__()
        self.conv, self.calls = nn.Conv2d(3, 4, 3), 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


def _before_model_work(fn: Callable[[nn.Module], object]) -> Callable[[Path], object]:
    """``fn(spy)`` must raise before the model ever runs (no capture, no lowering: no waiting)."""
    def call(work: Path):
        spy = _Spy()
        try:
            fn(spy)
        finally:
            assert spy.calls == 0, "the refusal came after the model was run"
    return call


def _fake_compiled(where: Path) -> graphopt.CompiledModel:
    """A host `CompiledModel` over a minimal build folder made in ``where`` (outside the snapshot)."""
    from graphopt.artifact import write_manifest

    build = Path(tempfile.mkdtemp(dir=where))
    write_manifest(build, {"target": {"name": "host"}, "runtime": "tvm-vm-native", "inputs": [], "outputs": []})
    return graphopt.CompiledModel(graphopt.get_target("host"), build, {"inputs": [], "outputs": []})


def _bad_cflag_spec():
    """cortex-m4 with a compiler flag gcc does not know: the link/compile step fails."""
    return dataclasses.replace(graphopt.get_target("cortex-m4"), name="cortex-m4-bad-flag", aliases=(),
                               cflags=(*graphopt.get_target("cortex-m4").cflags, "-mno-such-flag-xyz"))


@dataclass(frozen=True)
class Case:
    id: str
    error: type[Exception]
    fix: str  # regex the message must match (case-insensitive)
    call: Callable[[Path], object] | None = None  # API: call(scratch folder) must raise `error`
    argv: tuple[str, ...] | None = None  # CLI: `graphopt *argv` in the scratch folder
    files: dict[str, str] = field(default_factory=dict)  # written to the scratch folder before the snapshot
    tools: tuple[str, ...] = ()  # external tools the case needs


_SYNTAX = "import torch\n\n\ndef make(:\n    return None\n"
_FACTORY_RAISES = ("import torch\n\n\ndef helper():\n    raise ValueError('no weights at ./w.pt')\n\n\n"
                   "def make():\n    return helper()\n\n\ndef other():\n    return None\n")
_IMPORT_RAISES = "import torch\nSCALE = 1 / 0\n\n\ndef make():\n    return None\n"
_GOOD = ("import torch\n\n\ndef make():\n    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()\n"
         "    return m, (torch.randn(1, 3, 8, 8),)\n")

CASES = [
    # ---- quantize: calibration and scheme types
    Case("quantize-calibration-none", graphopt.QuantizationError, r"iterable of input batches",
         lambda w: graphopt.quantize(_cnn(), (X,), calibration=None)),
    Case("quantize-calibration-tensor", graphopt.QuantizationError, r"iterable of input batches.*single tensor",
         lambda w: graphopt.quantize(_cnn(), (X,), calibration=X)),
    Case("quantize-calibration-int", graphopt.QuantizationError, r"iterable of input batches",
         lambda w: graphopt.quantize(_cnn(), (X,), calibration=3)),
    Case("quantize-calibration-wrong-shape", graphopt.QuantizationError, r"expected shape \(N, 3, 8, 8\)",
         lambda w: graphopt.quantize(_cnn(), (X,), calibration=[torch.randn(4, 3, 9, 9)])),
    Case("quantize-calibration-wrong-dtype", graphopt.QuantizationError, r"expected shape .* torch.float32",
         lambda w: graphopt.quantize(_cnn(), (X,), calibration=[X.double()])),
    Case("prepare-qat-calibration-tensor", graphopt.QuantizationError, r"iterable of input batches",
         lambda w: graphopt.prepare_qat(_cnn(), (X,), calibration=X)),
    Case("scheme-weights-float", graphopt.QuantizationError, r"int bit width .* weights=8",
         lambda w: graphopt.QuantScheme(weights=8.0)),
    Case("scheme-weights-bool", graphopt.QuantizationError, r"int bit width .* weights=8",
         lambda w: graphopt.QuantScheme(weights=True)),
    Case("scheme-activations-bool", graphopt.QuantizationError, r"int bit width .* activations=8",
         lambda w: graphopt.QuantScheme(activations=True)),
    Case("layerquant-weights-float", graphopt.QuantizationError, r"int bit width",
         lambda w: graphopt.LayerQuant(weights=4.0)),
    Case("scheme-per-channel-str", graphopt.QuantizationError, r"True or False",
         lambda w: graphopt.QuantScheme(per_channel="no")),
    Case("scheme-percentile-str", graphopt.QuantizationError, r"must be a number",
         lambda w: graphopt.QuantScheme(percentile="99.9")),
    Case("scheme-overrides-list", graphopt.QuantizationError, r"overrides must map module paths",
         lambda w: graphopt.QuantScheme(overrides=[graphopt.LayerQuant()])),
    Case("recipe-quant-stage-float", graphopt.QuantizationError, r"int bit width",
         lambda w: graphopt.QuantStage(weights=8.0)),
    # ---- example inputs
    Case("compile-zero-size-input", graphopt.InputError, r"dimension of size 0.*at least 1",
         lambda w: graphopt.compile(_cnn(), (torch.randn(0, 3, 8, 8),), "host", progress=False)),
    Case("quantize-zero-size-input", graphopt.InputError, r"dimension of size 0.*at least 1",
         lambda w: graphopt.quantize(_cnn(), (torch.randn(1, 3, 0, 8),), [X])),
    Case("check-zero-size-input", graphopt.InputError, r"dimension of size 0",
         lambda w: graphopt.check(_cnn(), (torch.randn(1, 0, 8, 8),), "cortex-m4")),
    Case("compile-inputs-numpy", graphopt.InputError, r"tuple of tensors",
         lambda w: graphopt.compile(_cnn(), X.numpy(), "host", progress=False)),
    Case("compile-model-returns-none", graphopt.InputError, r"returned no tensor.*forward returns tensors",
         lambda w: graphopt.compile(_ReturnsNone(), (X,), "host", progress=False)),
    Case("compile-forward-raises", graphopt.InputError, r"model raised on the example inputs.*Check the number",
         lambda w: graphopt.compile(_Raises(), (X,), "host", progress=False)),
    Case("quantize-forward-raises", graphopt.InputError, r"model raised on the example inputs",
         lambda w: graphopt.quantize(_Raises(), (X,), [X])),
    Case("check-forward-raises", graphopt.InputError, r"model raised on the example inputs",
         lambda w: graphopt.check(_Raises(), (X,), "cortex-m4")),
    Case("prune-forward-raises", graphopt.InputError, r"model raised on the example inputs",
         lambda w: graphopt.prune(_Raises(), (X,), ratio=0.5)),
    # ---- not a module
    Case("check-none", graphopt.ConfigError, r"torch.nn.Module instance",
         lambda w: graphopt.check(None, (X,), "cortex-m4")),
    Case("compile-none", graphopt.ConfigError, r"torch.nn.Module instance",
         lambda w: graphopt.compile(None, (X,), "host", progress=False)),
    Case("compile-class-not-instance", graphopt.ConfigError, r"not the class",
         lambda w: graphopt.compile(nn.Conv2d, (X,), "host", progress=False)),
    Case("quantize-none", graphopt.QuantizationError, r"torch.nn.Module",
         lambda w: graphopt.quantize(None, (X,), [X])),
    Case("prune-none", graphopt.ConfigError, r"torch.nn.Module instance",
         lambda w: graphopt.prune(None, (X,), ratio=0.5)),
    Case("prunable-groups-none", graphopt.ConfigError, r"torch.nn.Module instance",
         lambda w: graphopt.prunable_groups(None, (X,))),
    Case("capture-state-dict", graphopt.ConfigError, r"not .* a state_dict",
         lambda w: graphopt.capture(_cnn().state_dict(), (X,))),
    Case("tune-none", graphopt.ConfigError, r"torch.nn.Module instance",
         lambda w: graphopt.tune(None, (X,), "host", progress=False)),
    Case("fit-none", graphopt.ConfigError, r"torch.nn.Module instance",
         lambda w: graphopt.fit(None, [(X, torch.tensor([0]))], lambda m, b: m(b[0]).sum())),
    Case("evaluate-data-tensor", graphopt.ConfigError, r"iterable of batches",
         lambda w: graphopt.evaluate(_cnn(), X)),
    Case("distill-teacher-none", graphopt.ConfigError, r"teacher must be a torch.nn.Module",
         lambda w: graphopt.distill(_cnn(), None, [(X, torch.tensor([0]))])),
    Case("magnitude-prune-none", graphopt.ConfigError, r"torch.nn.Module instance",
         lambda w: graphopt.magnitude_prune(None, 0.5)),
    Case("load-sparse-missing", graphopt.ArtifactError, r"file that graphopt.save_sparse wrote",
         lambda w: graphopt.load_sparse(w / "missing.npz")),
    # ---- other options
    Case("target-underscore", graphopt.UnknownTargetError, r"did you mean 'cortex-m4'",
         lambda w: graphopt.compile(_cnn(), (X,), "cortex_m4", progress=False)),
    Case("target-capitalized", graphopt.UnknownTargetError, r"did you mean 'cortex-m4'",
         lambda w: graphopt.check(_cnn(), (X,), "Cortex-M4")),
    Case("target-none", graphopt.ConfigError, r"target name \(str\)",
         lambda w: graphopt.compile(_cnn(), (X,), None, progress=False)),
    Case("compile-passes-str", graphopt.ConfigError, r"list of graphopt pass instances",
         lambda w: graphopt.compile(_cnn(), (X,), "host", passes="fold_batchnorm", progress=False)),
    Case("compile-rtol-str", graphopt.ConfigError, r"positive number, e.g. rtol=1e-4",
         lambda w: graphopt.compile(_cnn(), (X,), "host", rtol="1e-3", progress=False)),
    Case("compile-capture-method-typo", graphopt.ConfigError, r"use one of \['auto', 'export', 'symbolic_trace'\]",
         lambda w: graphopt.compile(_cnn(), (X,), "host", capture_method="trace", progress=False)),
    Case("compile-name-int", graphopt.ConfigError, r"C identifier",
         lambda w: graphopt.compile(_cnn(), (X,), "host", name=3, progress=False)),
    Case("compile-optimize-for-typo", graphopt.ConfigError, r"choose one of \['balanced', 'speed', 'size'\]",
         _before_model_work(lambda m: graphopt.compile(m, (X,), "cortex-m4", optimize_for="small", progress=False))),
    # ---- tuning databases: refused at once, before the model runs
    Case("tune-database-under-proc", TuningDatabaseError, r"cannot be written.*folder you can write",
         _before_model_work(lambda m: graphopt.tune(m, (X,), "host", trials=2, database="/proc/graphopt-db",
                                                    progress=False))),
    Case("tune-database-under-a-file", TuningDatabaseError, r"which is a file; give a folder",
         _before_model_work(lambda m: graphopt.tune(m, (X,), "host", trials=2, database="notes.txt/db",
                                                    progress=False)),
         files={"notes.txt": "the user's notes\n"}),
    Case("tune-database-int", TuningDatabaseError, r"folder path \(str or Path\)",
         _before_model_work(lambda m: graphopt.tune(m, (X,), "host", trials=2, database=3, progress=False))),
    Case("compile-database-missing", TuningDatabaseError, r"run graphopt.tune first",
         lambda w: graphopt.compile(_cnn(), (X,), "host", database=w / "no-db", progress=False)),
    # ---- a failing tool is reported with its own message
    Case("toolchain-error-carries-the-tools-message", graphopt.ToolchainError,
         r"-mno-such-flag-xyz.*\n(.*\n)*command: .*arm-none-eabi-gcc",
         lambda w: graphopt.compile(nn.ReLU(), (X,), _bad_cflag_spec(), progress=False),
         tools=("arm-none-eabi-gcc",)),
    # ---- the command line: one line naming file and line, exit 2
    Case("cli-factory-syntax-error", graphopt.ConfigError, r"SyntaxError: .* at .*model\.py:4: def make\(:",
         argv=("compile", "model.py:make", "--target", "host", "--out", "out"), files={"model.py": _SYNTAX}),
    Case("cli-factory-raises", graphopt.ConfigError,
         r"factory model\.py:make raised ValueError: no weights at \./w\.pt at .*model\.py:5 in helper",
         argv=("compile", "model.py:make", "--target", "host", "--out", "out"), files={"model.py": _FACTORY_RAISES}),
    Case("cli-module-raises-on-import", graphopt.ConfigError, r"importing model raised ZeroDivisionError.*model\.py:2",
         argv=("compile", "model:make", "--target", "host", "--out", "out"), files={"model.py": _IMPORT_RAISES}),
    Case("cli-missing-module", graphopt.ConfigError, r"no module 'no_such_models'.*PYTHONPATH",
         argv=("compile", "no_such_models:make", "--target", "host", "--out", "out")),
    Case("cli-missing-file", graphopt.ConfigError, r"no such file: .*nope\.py",
         argv=("compile", "nope.py:make", "--target", "host", "--out", "out")),
    Case("cli-missing-attribute", graphopt.ConfigError, r"has no callable 'mak'; it defines helper, make, other",
         argv=("compile", "model.py:mak", "--target", "host", "--out", "out"), files={"model.py": _FACTORY_RAISES}),
    Case("cli-target-typo", graphopt.UnknownTargetError, r"did you mean 'cortex-m4'",
         argv=("compile", "model.py:make", "--target", "cortex_m4", "--out", "out"), files={"model.py": _GOOD}),
    # saving and loading artifacts
    Case("save-into-user-folder", graphopt.ArtifactError, r"not a graphopt artifact and is not empty.*new or empty folder",
         call=lambda work: _fake_compiled(work.parent).save(work), files={"src/mycode.py": "print('mine')\n"}),
    Case("save-onto-a-file", graphopt.ArtifactError, r"not a folder; choose a new folder path",
         call=lambda work: _fake_compiled(work.parent).save(work / "notes.txt"), files={"notes.txt": "mine"}),
    Case("cli-compile-out-user-folder", graphopt.ArtifactError, r"not a graphopt artifact .*src.*new or empty folder",
         argv=("compile", "model.py:make", "--target", "host", "--out", "."),
         files={"model.py": _GOOD, "src/mycode.py": "print('mine')\n"}),
    Case("load-none", graphopt.ConfigError, r"path of a saved artifact folder",
         call=lambda work: graphopt.CompiledModel.load(None)),
    Case("load-foreign-manifest", graphopt.ArtifactError, r"not written by graphopt; pass the folder",
         call=lambda work: graphopt.CompiledModel.load(work), files={"manifest.json": '{"name": "another tool"}'}),
    Case("cli-tune-database-under-proc", TuningDatabaseError, r"cannot be written",
         argv=("tune", "model.py:make", "--target", "host", "--db", "/proc/graphopt-db"), files={"model.py": _GOOD}),
]


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: kind, size and mtime for files, target for symlinks."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            rel = p.relative_to(folder).as_posix()
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else \
                ("dir",) if p.is_dir() else ("file", st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A scratch folder that is the current folder and ``$TMPDIR`` (build folders would land in it)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(work))
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch-cache"))  # torch's cache, not graphopt's
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # importing a factory file must not add __pycache__
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the current folder on sys.path
    yield work
    for name in ("model", "no_such_models"):  # factories imported by name must not leak into later cases
        sys.modules.pop(name, None)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, work: Path, capsys):
    if case.tools:
        require_tools(*case.tools)
    for name, text in case.files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    before = _snapshot(work)
    if case.argv is None:
        with pytest.raises(case.error) as info:
            case.call(work)
        message = str(info.value)
    else:
        args = build_parser().parse_args(list(case.argv))
        with pytest.raises(case.error):
            args.func(args)
        capsys.readouterr()
        sys.modules.pop("model", None)
        assert main(list(case.argv)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("graphopt: error:")]
        assert len(errors) == 1, err
        message = errors[0]
    assert isinstance(message, str) and re.search(case.fix, message, re.I | re.S), message
    assert _snapshot(work) == before, "a refused call wrote or deleted files"


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# -------------------------------------------------------------------------------------------------------------
# Paths with a comma, quotes, a space and $ reach every tool intact: gcc/ld (map file, linker script), the
# QEMU semihosting and plugin options, and the aarch64 runner's output lines. Before, ld split
# "-Wl,-Map,<path>" at the comma, failed, and wrote a stray empty file named after the path's first part.

WEIRD = "we ird,'q\"$x"


@pytest.mark.parametrize("target,tools", [
    ("cortex-m4", ("arm-none-eabi-gcc", "qemu-system-arm")),
    ("arm", ("aarch64-linux-gnu-g++", "qemu-aarch64")),
])
def test_tmpdir_with_metacharacters_compiles_runs_and_counts(target, tools, tmp_path, monkeypatch):
    require_tools(*tools)
    weird = tmp_path / WEIRD
    weird.mkdir()
    monkeypatch.setenv("TMPDIR", str(weird))
    monkeypatch.setattr(tempfile, "tempdir", str(weird))
    model = _cnn()
    cm = graphopt.compile(model, (X,), target, verify=True, rtol=1e-4, progress=False)  # runs it under QEMU
    assert cm.report.instructions_per_inference and cm.report.instructions_per_inference > 0
    with torch.no_grad():
        torch.testing.assert_close(cm(X), model(X), rtol=1e-4, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [WEIRD], "a tool wrote a file next to the temp folder"


def test_a_failing_tool_reports_its_own_error_line_and_a_pasteable_command(tmp_path):
    from graphopt.toolchain import run_tool

    require_tools("gcc")
    src = tmp_path / WEIRD / "bad.c"
    src.parent.mkdir()
    src.write_text("int main(void) { return undeclared_thing; }\n")
    with pytest.raises(graphopt.ToolchainError) as info:
        run_tool(["gcc", "-c", str(src), "-o", str(src.with_suffix(".o"))], "compiling bad.c")
    msg = str(info.value)
    assert "undeclared_thing" in msg and "error" in msg  # gcc's own diagnostic
    import shlex

    assert shlex.split(msg.splitlines()[-1].removeprefix("command: "))[2] == str(src)  # quoted intact
    assert [p.name for p in tmp_path.iterdir()] == [WEIRD] and not src.with_suffix(".o").exists()
