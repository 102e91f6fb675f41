"""Saving artifacts never destroys what graphopt did not write; swaps are atomic; kills leave no debris."""
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.artifact import MANIFEST, publish, write_manifest
from graphopt.compiled import CompiledModel


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def fake_build(folder: Path, payload: bytes = b"library") -> Path:
    """A build folder as a backend leaves it: a manifest and some files."""
    folder.mkdir(parents=True)
    (folder / "model.so").write_bytes(payload)
    (folder / "lib").mkdir()
    (folder / "lib" / "runtime.so").write_bytes(b"runtime")
    write_manifest(folder, {"target": {"name": "host"}, "runtime": "tvm-vm-native", "inputs": [], "outputs": []})
    return folder


@pytest.fixture
def build(tmp_path):
    return fake_build(tmp_path / "build-src")


@pytest.mark.parametrize("layout", [["demo/manifest.json", "rcnn/model.so"], ["src/mycode.py"], ["notes.txt"],
                                    [".hidden"]])
def test_non_artifact_folder_is_refused_and_untouched(tmp_path, build, layout):
    dst = tmp_path / "user"
    for rel in layout:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_text("the user's own file")
    before = snapshot(dst)
    with pytest.raises(graphopt.ArtifactError, match="not a graphopt artifact and is not empty") as info:
        publish(build, dst)
    assert str(dst) in str(info.value) and Path(layout[0]).parts[0] in str(info.value)
    assert snapshot(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build-src", "user"]  # no staging debris


def test_save_to_current_folder_refused(tmp_path, build):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "mycode.py").write_text("print('mine')\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(graphopt.ArtifactError, match="src"):
            publish(build, ".")
    finally:
        os.chdir(cwd)
    assert (tmp_path / "src" / "mycode.py").read_text() == "print('mine')\n"


def test_new_and_empty_destinations_get_the_artifact_with_the_umask(tmp_path, build):
    old = os.umask(0o027)
    try:
        (tmp_path / "empty").mkdir()
        for dst in (tmp_path / "a" / "b" / "new", tmp_path / "empty"):
            assert publish(build, dst) == dst
            assert (dst / "model.so").read_bytes() == b"library"
            assert stat.S_IMODE(dst.stat().st_mode) == 0o750
            assert stat.S_IMODE((dst / "lib").stat().st_mode) == 0o750
            manifest = json.loads((dst / MANIFEST).read_text())
            assert set(manifest["artifact_files"]) == {"model.so", "lib/runtime.so"}
    finally:
        os.umask(old)


def test_existing_artifact_is_replaced_unless_overwrite_false(tmp_path, build):
    dst = publish(build, tmp_path / "art")
    newer = fake_build(tmp_path / "build-2", b"newer library")
    with pytest.raises(graphopt.ArtifactError, match="overwrite=True"):
        publish(newer, dst, overwrite=False)
    assert (dst / "model.so").read_bytes() == b"library"
    publish(newer, dst)
    assert (dst / "model.so").read_bytes() == b"newer library"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "build-2", "build-src"]


def test_artifact_holding_user_files_is_not_replaced(tmp_path, build):
    dst = publish(build, tmp_path / "art")
    (dst / "lib" / "my_notes.txt").write_text("mine")
    (dst / "cmake-build").mkdir()
    before = snapshot(dst)
    with pytest.raises(graphopt.ArtifactError, match="did not write") as info:
        publish(build, dst)
    assert "lib/my_notes.txt" in str(info.value) and "cmake-build" in str(info.value)
    assert snapshot(dst) == before


def test_a_file_or_symlink_destination_is_refused(tmp_path, build):
    (tmp_path / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for dst in ("f", "link"):
        with pytest.raises(graphopt.ArtifactError, match="not a folder"):
            publish(build, tmp_path / dst)
    assert (tmp_path / "f").read_text() == "x" and not (tmp_path / "elsewhere").exists()


_KILLABLE = textwrap.dedent("""
    import os, sys, time, shutil
    from pathlib import Path
    import graphopt.artifact as art
    src, dst, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    if where == "copy":
        def slow(a, b, **kw):
            shutil.copy2(a, b, **kw)
            print("copying", flush=True); time.sleep(60)
        real_tree = shutil.copytree
        art.shutil.copytree = lambda *a, **kw: real_tree(*a, **kw, copy_function=slow)
    else:  # between the two renames of a file system without renameat2(RENAME_EXCHANGE)
        art._exchange = lambda a, b: False
        real = os.rename
        def slow(a, b):
            real(a, b)
            if Path(b).name.startswith(f".{dst.name}.old-"):
                print("renamed", flush=True); time.sleep(60)
        os.rename = slow
    art.publish(src, dst)
""")


@pytest.mark.parametrize("where", ["copy", "between-renames"])
def test_kill_9_during_save_is_recovered_by_the_next_save(tmp_path, build, where):
    dst = publish(build, tmp_path / "art")
    newer = fake_build(tmp_path / "build-2", b"newer library")
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(newer), str(dst), where], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() in ("copying", "renamed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    debris = [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")]
    assert debris, "the kill should have left a staging folder to recover"
    if where == "copy":
        assert (dst / "model.so").read_bytes() == b"library"  # the old artifact, whole
    publish(newer, dst)
    assert (dst / "model.so").read_bytes() == b"newer library"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "build-2", "build-src"]


def test_staging_folders_of_live_processes_and_foreign_names_are_left_alone(tmp_path, build):
    live = tmp_path / f".art.partial-{os.getpid()}-abc123"
    live.mkdir()
    other = tmp_path / ".art.partial-notapid"
    other.mkdir()
    publish(build, tmp_path / "art")
    assert live.is_dir() and other.is_dir()


@pytest.fixture(scope="module")
def compiled():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    return graphopt.compile(model, (x,), target="host", progress=False), x


def test_build_folder_is_private_and_a_deleted_one_raises(compiled, tmp_path):
    cm, x = compiled
    assert stat.S_IMODE(cm.build_dir.stat().st_mode) == 0o700
    model = torch.nn.Linear(4, 2).eval()
    gone = graphopt.compile(model, (torch.randn(1, 4),), target="host", progress=False)
    import shutil

    shutil.rmtree(gone.build_dir)
    with pytest.raises(graphopt.ArtifactError, match="Recompile"):
        gone(torch.randn(1, 4))
    with pytest.raises(graphopt.ArtifactError, match="recompile"):
        gone.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_loaded_artifact_that_was_modified_is_refused(compiled, tmp_path):
    cm, x = compiled
    saved = cm.save(tmp_path / "art")
    assert torch.equal(CompiledModel.load(saved)(x), cm(x))
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["inputs"][0]["shape"] = [1, 3, 9, 9]
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(graphopt.ArtifactError, match="edited"):
        CompiledModel.load(saved)
    saved2 = cm.save(tmp_path / "art2")
    (saved2 / "model.so").write_bytes((saved2 / "model.so").read_bytes() + b"\0")
    with pytest.raises(graphopt.ArtifactError, match="model.so changed"):
        CompiledModel.load(saved2)


_BUILD_AND_EXIT = textwrap.dedent("""
    import os, sys, torch, graphopt
    cm = graphopt.compile(torch.nn.Linear(3, 2).eval(), (torch.randn(1, 3),), target="host", progress=False)
    print(cm.build_dir, flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), 9)
""")


def test_build_folders_go_at_exit_and_after_a_kill(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    for how in ("exit", "kill"):
        out = subprocess.run([sys.executable, "-c", _BUILD_AND_EXIT, how], env=env, capture_output=True, text=True,
                             timeout=600)
        build_dir = Path(out.stdout.strip().splitlines()[-1])
        assert build_dir.parent == tmp_path
        assert build_dir.exists() == (how == "kill")
    # the next build in a new process removes the dead process's folder
    subprocess.run([sys.executable, "-c", _BUILD_AND_EXIT, "exit"], env=env, check=True, capture_output=True,
                   timeout=600)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("graphopt-build-")]
    assert not [p.name for p in tmp_path.iterdir() if "graphopt" in p.name]
