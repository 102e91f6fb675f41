"""Tuning the tensorized int8 dot kernels: every register tile and loop order `TensorizedDot` offers
computes the default schedule's output bit for bit; the first tile is the default; tuning measures the
tiles in order, records them, resumes after the ones spent, and compile applies a tile only where it
beat the default."""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from test_tune import kernels_decided
from torch import nn
from tvm.s_tir.meta_schedule.arg_info import ArgInfo

import graphopt
from graphopt.passes.pipeline import Pipeline
from graphopt.targets import get_target
from graphopt.targets.lowering.schedules import CpuParams, dot_schedule, dot_tiles, schedule_module
from graphopt.targets.spec import Feature
from graphopt.targets.tuning.database import RECORDS, open_database
from graphopt.targets.tuning.metaschedule import extract, fused_module

SHAPE = (1, 16, 5, 6)  # 6 pixels per row (tiles of 1, 2, 3, 6), 48 channels = 3 VNNI tiles


def _quantized():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 48, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                      nn.Linear(48 * 5 * 6, 10)).eval()
    x = torch.randn(SHAPE)
    return graphopt.quantize(m, (x,), [(torch.randn(SHAPE),) for _ in range(3)]), x


def _conv_task(spec):
    """The tuning task of `_quantized()`'s conv (a tensorized dot kernel; its dense has one tile)."""
    q, x = _quantized()
    (task,) = [t for t in extract(fused_module(Pipeline(q, (x,), spec).exported, spec), spec)
               if t.task_name.startswith("fused_conv2d_int8")]
    return task


def _args(func, rng) -> list:
    """Random operands: int8 tensors over their whole range; int32 ones (bias, multiplier, shift) small,
    so no shift exceeds the word; the output zeroed."""
    infos = ArgInfo.from_prim_func(func)
    out = []
    for i, info in enumerate(infos):
        shape, dtype = [int(d) for d in info.shape], str(info.dtype)
        if i == len(infos) - 1:
            out.append(np.zeros(shape, dtype))
        elif dtype == "int8":
            out.append(rng.integers(-128, 128, shape).astype(dtype))
        else:
            out.append(rng.integers(0, 16, shape).astype(dtype))
    return out


def _run(mod, spec, args) -> np.ndarray:
    tensors = [tvm.runtime.tensor(a) for a in args]
    tvm.compile(mod, target=spec.tvm()).mod["main"](*tensors)
    return tensors[-1].numpy()


def test_every_tile_computes_the_default_schedule_output_bit_for_bit():
    spec = get_target("host")
    task = _conv_task(spec)
    func = task.dispatched[0]["main"]
    tiles = dot_tiles(func, spec)
    assert len(tiles) >= 8 and len(set(tiles)) == len(tiles)
    assert {t.pixel_outer for t in tiles} == {True, False} and {t.pixels for t in tiles} >= {1, 2, 3, 6}
    default = schedule_module(tvm.IRModule({"main": func}), spec)[0]["main"]
    with spec.tvm():
        mods = [dot_schedule(tvm.s_tir.Schedule(func), spec, t).mod for t in tiles]
    # the first tile is what compile schedules without a database
    assert tvm_ffi.structural_equal(mods[0]["main"].with_attr("tirx.is_scheduled", True), default)
    assert len({tvm_ffi.structural_hash(m) for m in mods}) == len(mods)  # each tile a different schedule
    rng = np.random.default_rng(0)
    for _ in range(2):
        args = _args(func, rng)
        want = _run(tvm.IRModule({"main": default}), spec, args)
        assert want.any()
        for tile, mod in zip(tiles, mods, strict=True):
            np.testing.assert_array_equal(_run(mod, spec, args), want, err_msg=str(tile))


def test_tile_model_keeps_weight_tiles_in_l1_when_it_knows_the_cache():
    """256 channels at 14×14: by load count alone 2 pixels × 8 channel vectors (288 KiB of weights
    re-read per pixel pair); with a 48 KiB L1 the charge on weights streamed from L2 picks 7 × 2 (ran
    1.5× faster on the host it was measured on, `schedules._L2_LOAD_COST`). On 16-lane VNNI the stack
    limit (accumulators strictly under 1 KiB: at most 15 vectors) now rules 2 × 8 out with or without a
    cache size, so both pick 7 × 2."""
    host = get_target("host")
    if not CpuParams.from_spec(host).dots:
        pytest.skip("the host has no int8 dot kernel")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 256, 14, 14)
    q = graphopt.quantize(m, (x,), [(torch.randn_like(x),)])

    def first_tile(spec):
        (task,) = [t for t in extract(fused_module(Pipeline(q, (x,), spec).exported, spec), spec)
                   if t.task_name.startswith("fused_conv2d_int8")]
        tile = dot_tiles(task.dispatched[0]["main"], spec)[0]
        return tile.pixels, tile.vectors

    assert first_tile(dataclasses.replace(host, l1d_bytes=48 << 10)) == (7, 2)
    assert first_tile(dataclasses.replace(host, l1d_bytes=None)) == (7, 2)


def test_one_channel_tile_goes_outermost_on_x86_only():
    """A 16-channel int8 conv (ResNet-20's first stage) has one channel tile of x86's 16 lanes: both
    orders re-stream alike, and x86 puts the channel tile outermost (0.72-0.88x per kernel measured,
    `CpuParams.channels_outer_on_ties`); arm-a55's 4-lane sdot kernels give 4 channel tiles, whose order
    the re-stream comparison decides as before."""
    host = get_target("host")
    if not CpuParams.from_spec(host).dots:
        pytest.skip("the host has no int8 dot kernel")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 16, 32, 32)
    q = graphopt.quantize(m, (x,), [(torch.randn_like(x),)])

    def first_tile(spec):
        (task,) = [t for t in extract(fused_module(Pipeline(q, (x,), spec).exported, spec), spec)
                   if t.task_name.startswith("fused_conv2d_int8")]
        return dot_tiles(task.dispatched[0]["main"], spec)[0]

    assert CpuParams.from_spec(host).channels_outer_on_ties
    assert not first_tile(host).pixel_outer
    assert not CpuParams.from_spec(get_target("arm-a55")).channels_outer_on_ties


def test_small_weights_keep_each_pixels_channels_on_one_core():
    """A 16→96 1×1 int8 conv (MobileNetV2's first expand) has 1.5 KB of weights: with a known L1 the pixel
    tiles go outermost, so no two cores write the channel halves of the same pixels (channel tiles
    outermost ran 4× slower in the model, `TensorizedDot.default_tile`); without a cache size (the ARM
    targets) the re-stream count decides as before."""
    host = get_target("host")
    if not CpuParams.from_spec(host).dots:
        pytest.skip("the host has no int8 dot kernel")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 96, 1), nn.ReLU6()).eval()
    x = torch.randn(1, 16, 28, 28)
    q = graphopt.quantize(m, (x,), [(torch.randn_like(x),)])

    def first_tile(spec):
        (task,) = [t for t in extract(fused_module(Pipeline(q, (x,), spec).exported, spec), spec)
                   if t.task_name.startswith("fused_conv2d_int8")]
        return dot_tiles(task.dispatched[0]["main"], spec)[0]

    assert first_tile(dataclasses.replace(host, l1d_bytes=48 << 10)).pixel_outer
    assert not first_tile(dataclasses.replace(host, l1d_bytes=None)).pixel_outer


@pytest.mark.slow
def test_tuning_measures_tiles_in_order_resumes_and_compile_stays_exact(tmp_path):
    spec = get_target("host")
    q, x = _quantized()
    task = _conv_task(spec)
    func = task.dispatched[0]["main"]
    tiles = dot_tiles(func, spec)
    db = tmp_path / "db"
    first = graphopt.tune(q, (x,), "host", trials=40, trials_per_task=2, database=db, progress=False)
    second = graphopt.tune(q, (x,), "host", trials=40, trials_per_task=5, database=db, progress=False)
    (row1,) = [t for t in first.tasks if t.name == task.task_name]
    (row2,) = [t for t in second.tasks if t.name == task.task_name]
    assert (row1.trials, row2.trials, row2.new_trials) == (2, 5, 3)  # resumed after the 2 spent
    assert row2.default_seconds is not None
    database = open_database(db, writable=False)
    records = database.get_top_k(database.commit_workload(task.dispatched[0]), 100)
    with spec.tvm():
        want = {tvm_ffi.structural_hash(dot_schedule(tvm.s_tir.Schedule(func), spec, t).mod) for t in tiles[1:6]}
        got = {tvm_ffi.structural_hash(_replayed(r, func)) for r in records}
    assert got == want  # the 5 tiles after the default, in the load model's order
    cm = graphopt.compile(q, (x,), "host", database=db, progress=False)
    untuned = graphopt.compile(q, (x,), "host", progress=False)
    assert task.task_name in kernels_decided(cm)
    for i in range(3):
        xi = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        assert torch.equal(cm(xi), untuned(xi))


_OPEN_READ_ONLY = """
import sys
from graphopt.targets.tuning.database import RECORDS, open_database
db = open_database(sys.argv[1], writable=False)
print(len(db), len(db.damaged), len(db.unreadable))
"""


def test_a_fresh_process_reads_tensorized_records(tmp_path):
    """A record of a tensorized kernel replays ``tensorize`` with a dot kernel's intrinsic, which a process
    registers only when it first schedules such a kernel: compile(database=...) in a new process (the
    CLI, a build pipeline) skipped every tuned int8 kernel as a damaged line. The database registers the
    intrinsics a record names before reading it; ``graphopt compile --db`` applies the kernel."""
    from tvm.s_tir import meta_schedule as ms

    spec = get_target("host")
    task = _conv_task(spec)
    func = task.dispatched[0]["main"]
    sch = dot_schedule(tvm.s_tir.Schedule(func), spec, dot_tiles(func, spec)[0])
    db = open_database(tmp_path / "db")
    record = ms.database.TuningRecord(sch.trace, db.commit_workload(task.dispatched[0]), [1e-5], spec.tvm(),
                                      ArgInfo.from_prim_func(func))
    db.commit_tuning_record(record)
    db.close()
    assert '"Tensorize"' in (tmp_path / "db" / RECORDS).read_text()  # the record names a dot intrinsic
    out = subprocess.run([sys.executable, "-c", _OPEN_READ_ONLY, str(tmp_path / "db")], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["1", "0", "0"]  # read, nothing damaged or unreadable
    # the build pipeline's way: `graphopt compile --db` in a new process applies the tuned kernel
    (tmp_path / "model.py").write_text(_FACTORY.format(tests=str(Path(__file__).parent)))
    cli = subprocess.run([sys.executable, "-m", "graphopt.cli", "compile", str(tmp_path / "model.py:make"),
                          "--target", "host", "--db", str(tmp_path / "db"), "--out", str(tmp_path / "out"),
                          "--json", "--quiet", "--no-cache", "--no-count-instructions"],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    report = json.loads(cli.stdout)
    assert report["lowering"]["from_database"] == [task.task_name]
    assert not [w for w in report["warnings"] if "database" in w]


_FACTORY = """
import sys
sys.path.insert(0, {tests!r})
from test_tune_dot import _quantized


def make():
    q, x = _quantized()
    return q, (x,)
"""


def _replayed(record, func):
    sch = tvm.s_tir.Schedule(func)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod


def test_avx512_int8_accumulator_tiles_stay_under_the_stack_limit():
    """TVM keeps a buffer on the stack only strictly below 1 KiB: a 16-pixel × one-vector int32 tile of
    AVX-512 VNNI (16 × 16 × 4 B = 1 KiB exactly) went through `TVMBackendAllocWorkspace` every task
    (ResNet-20's 16-channel int8 convs; below the limit ResNet-20 int8 ran 0.94× end to end, 1 thread). Every
    tile offered for such a conv stays below it, and the default one compiles to VNNI dot products with no
    workspace under 1 KiB."""
    host = get_target("host")
    spec = dataclasses.replace(host, name="avx512vnni", vector_bits=512, num_cores=2, aliases=(),
                               features=frozenset({Feature.AVX2, Feature.FMA, Feature.AVX512, Feature.AVX512_VNNI}),
                               tvm_target={"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 16, 32, 32)
    q = graphopt.quantize(m, (x,), [(torch.randn_like(x),)])
    (task,) = [t for t in extract(fused_module(Pipeline(q, (x,), spec).exported, spec), spec)
               if t.task_name.startswith("fused_conv2d_int8")]
    func = task.dispatched[0]["main"]
    tiles = dot_tiles(func, spec)
    assert tiles and max(t.pixels * t.vectors for t in tiles) * 16 * 4 < 1024
    func = schedule_module(tvm.IRModule({"main": func}), spec)[0]["main"]
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=spec.tvm())
    code = lib.mod.imports[0] if lib.mod.imports else lib.mod
    assert "vpdpbusd" in code.inspect_source("asm")
    # nor do the intrinsic's operands: named in TVMScript they were 1-element local buffers that every parallel
    # task allocated as 4- and 64-byte workspaces and round-tripped through memory (ResNet-20 int8 0.88x without)
    sizes = [int(n) for n in re.findall(r"call ptr %\w+\(i32 1, i32 %dev_id, i64 (\d+)", code.inspect_source("ll"))]
    assert all(n >= 1024 for n in sizes), sizes
