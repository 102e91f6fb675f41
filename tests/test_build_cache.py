"""The build cache: an identical build is copied, anything that changes the artifact misses, damage and
kills cost a rebuild and nothing else, the size bound removes only the cache's own entries."""
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import graphopt
from graphopt.build_cache import BuildCache
from graphopt.errors import ConfigError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


X = torch.randn(1, 3, 9, 9)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "builds"
    monkeypatch.setenv("GRAPHOPT_BUILD_CACHE", str(folder))
    return folder


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_identical_build_is_copied_and_runs_the_same(cache_dir):
    model = Net().eval()
    first = graphopt.compile(model, (X,), "host", progress=False)
    assert first.report.build_cache["hit"] is False and "lower and build" in first.report.timings
    second = graphopt.compile(model, (X,), "host", progress=False)
    assert second.report.build_cache["hit"] is True and "lower and build" not in second.report.timings
    assert second.build_dir != first.build_dir
    assert second.report.lowering == json.loads(json.dumps(first.report.lowering, default=str))
    for x in (X, torch.randn(1, 3, 9, 9)):
        assert torch.equal(first(x), second(x))
    assert len(entries(cache_dir)) == 1
    assert "build cache: hit" in second.report.to_markdown()


def test_what_changes_the_artifact_changes_the_key(cache_dir):
    model = Net().eval()
    graphopt.compile(model, (X,), "host", progress=False)
    with torch.no_grad():
        model.fc.bias[0] += 1e-3  # one float of one constant
    changed = graphopt.compile(model, (X,), "host", progress=False)
    assert changed.report.build_cache["hit"] is False
    with torch.no_grad():
        assert torch.allclose(changed(X), model(X), atol=1e-5)
    renamed = graphopt.compile(model, (X,), "host", progress=False, name="other")
    assert renamed.report.build_cache["hit"] is False
    bigger = graphopt.compile(model, (torch.randn(1, 3, 11, 11),), "host", progress=False)
    assert bigger.report.build_cache["hit"] is False
    small = graphopt.compile(model, (X,), "host", progress=False, optimize_for="size")
    assert small.report.build_cache["hit"] is False
    assert len(entries(cache_dir)) == 5
    off = graphopt.compile(model, (X,), "host", progress=False, cache=False)
    assert off.report.build_cache == {"used": False} and len(entries(cache_dir)) == 5


def test_damaged_entry_is_rebuilt(cache_dir):
    model = Net().eval()
    graphopt.compile(model, (X,), "host", progress=False)
    (entry,) = entries(cache_dir)
    lib = next(p for p in (cache_dir / entry / "files").rglob("*.so"))
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    again = graphopt.compile(model, (X,), "host", progress=False)
    assert again.report.build_cache["hit"] is False
    with torch.no_grad():
        assert torch.allclose(again(X), model(X), atol=1e-5)
    assert entries(cache_dir) == [entry]  # the damaged copy was replaced by the new build
    assert graphopt.compile(model, (X,), "host", progress=False).report.build_cache["hit"] is True


def test_unwritable_cache_costs_a_warning_not_the_compile(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("the user's")
    monkeypatch.setenv("GRAPHOPT_BUILD_CACHE", str(blocker / "builds"))
    cm = graphopt.compile(Net().eval(), (X,), "host", progress=False)
    assert any("build cache not written" in w for w in cm.report.warnings)
    assert blocker.read_text() == "the user's"


def test_size_setting_is_checked(cache_dir, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_BUILD_CACHE_MB", "2G")
    with pytest.raises(ConfigError, match="GRAPHOPT_BUILD_CACHE_MB"):
        graphopt.compile(Net().eval(), (X,), "host", progress=False)


def _build_folder(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.so").write_bytes(os.urandom(size))
    return folder


def test_size_bound_removes_least_recently_used_entries_only(tmp_path):
    cache = BuildCache(tmp_path / "builds", max_bytes=2500)
    cache.folder.mkdir()
    (cache.folder / "notes.txt").write_text("mine")
    (cache.folder / ("z" * 64)).mkdir()  # not a key (not hex): not the cache's
    keys = [f"{i:064x}" for i in range(3)]
    for i, key in enumerate(keys[:2]):
        cache.store(key, _build_folder(tmp_path / f"b{i}", 1000), {"i": i})
    out = tmp_path / "out"
    out.mkdir()
    assert cache.fetch(keys[0], out) == {"i": 0}  # keys[0] is now the most recently used
    cache.store(keys[2], _build_folder(tmp_path / "b2", 1000), {"i": 2})
    assert [k for k, _, _ in cache.entries()] == [keys[0], keys[2]]
    assert (cache.folder / "notes.txt").read_text() == "mine" and (cache.folder / ("z" * 64)).is_dir()
    huge = f"{9:064x}"
    cache.store(huge, _build_folder(tmp_path / "b9", 5000), {})
    assert [k for k, _, _ in cache.entries()] == [huge]  # alone over the bound, but kept


def test_store_killed_mid_way_leaves_debris_the_next_store_removes(tmp_path):
    folder = tmp_path / "builds"
    folder.mkdir()
    script = textwrap.dedent(f"""
        import os, signal, tempfile
        stage = tempfile.mkdtemp(prefix=f".staging-{{os.getpid()}}-", dir={str(folder)!r})
        open(os.path.join(stage, "half"), "wb").write(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    live = folder / f".staging-{os.getpid()}-live"  # a store in progress in a live process
    live.mkdir()
    assert len(list(folder.glob(".staging-*"))) == 2
    cache = BuildCache(folder)
    key = f"{1:064x}"
    cache.store(key, _build_folder(tmp_path / "b", 10), {})
    assert [p.name for p in folder.glob(".staging-*")] == [live.name]
    assert entries(folder) == [key]


def _store_same_key(folder: str, src: str, barrier) -> None:
    barrier.wait()
    BuildCache(Path(folder)).store(f"{7:064x}", Path(src), {"by": os.getpid()})


def test_concurrent_stores_of_one_key_keep_one_whole_entry(tmp_path):
    src = _build_folder(tmp_path / "b", 200_000)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_store_same_key, args=(str(tmp_path / "builds"), str(src), barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    folder = tmp_path / "builds"
    assert entries(folder) == [f"{7:064x}"] and not list(folder.glob(".staging-*"))
    out = tmp_path / "out"
    out.mkdir()
    assert BuildCache(folder).fetch(f"{7:064x}", out) is not None
    assert (out / "model.so").read_bytes() == (src / "model.so").read_bytes()


@pytest.mark.emulation
def test_cortex_m_library_hit_keeps_its_report(cache_dir):
    from conftest import require_tools

    require_tools("arm-none-eabi-gcc", "qemu-system-arm")
    model = Net().eval()
    first = graphopt.compile(model, (X,), "cortex-m4", progress=False)
    second = graphopt.compile(model, (X,), "cortex-m4", progress=False)
    assert second.report.build_cache["hit"] is True
    assert second.report.instructions_per_inference == first.report.instructions_per_inference
    assert second.report.lowering == json.loads(json.dumps(first.report.lowering, default=str))
    assert torch.equal(first(X), second(X))


def _users_function(x):
    return x * 2


torch.fx.wrap("_users_function")


class CallsUserCode(nn.Module):
    def forward(self, x):
        return _users_function(torch.relu(x))


def test_graph_calling_users_code_is_not_cached():
    """The graph's code names the function but not its body: a changed body must not hit."""
    from graphopt.build_cache import graph_digest

    assert graph_digest(torch.fx.symbolic_trace(CallsUserCode())) is None
    plain = torch.fx.symbolic_trace(Net().eval())  # torch.nn leaf modules: class, settings and weights
    assert graph_digest(plain) == graph_digest(torch.fx.symbolic_trace(plain))
    other = Net().eval()
    other.conv.stride = (2, 2)
    other.load_state_dict(plain.state_dict())
    assert graph_digest(torch.fx.symbolic_trace(other)) != graph_digest(plain)
