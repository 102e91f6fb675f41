"""graphopt.tune: MetaSchedule tuning into a crash-safe database, resume after kill -9, and compile.

One tuning session is shared by the tests (tuning starts slowly: ~30 s of TVM worker start-up).
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import graphopt
from graphopt.targets.tuning.database import DEFAULTS, PAIRED, RECORDS, SPENT, WORKLOADS, beats_default, open_database

TRIALS = 4

_CHILD = """
import sys, torch, graphopt
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
graphopt.tune(m, (torch.randn(2, 64),), "host", trials={trials}, database=sys.argv[1])
"""


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32)).eval(), (torch.randn(2, 64),)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Tune in a subprocess, kill -9 it once a record is committed, then resume in-process."""
    db = tmp_path_factory.mktemp("tune") / "host"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(trials=TRIALS), str(db)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _lines(db / RECORDS):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _lines(db / RECORDS)
    assert before, "the killed session committed no record within 300 s"
    model, args = _model()
    summary = graphopt.tune(model, args, "host", trials=TRIALS, database=db, progress=False)
    return db, before, summary


def test_kill_resume_keeps_records_and_counts_them(killed_and_resumed):
    db, before, summary = killed_and_resumed
    after = _lines(db / RECORDS)
    assert after[:len(before)] == before  # every committed record kept, byte for byte
    assert all(json.loads(line) for line in after)  # nothing half-written
    (task,) = summary.tasks
    assert task.trials == TRIALS and task.new_trials == TRIALS - len(before)  # resumed, not restarted
    assert not summary.damaged_lines


def kernels_decided(cm) -> dict:
    """kernel -> "tuned" (a record applied) or "default" (the database kept graphopt's schedule)."""
    lowering = cm.report.lowering
    return {**{k: "tuned" for k in lowering["from_database"]},
            **{k["kernel"]: "default" for k in lowering["default_kept"]}}


def test_compile_with_database_same_outputs(killed_and_resumed):
    db, _, summary = killed_and_resumed
    model, args = _model()
    cm = graphopt.compile(model, args, "host", database=db, progress=False)
    (task,) = summary.tasks
    assert task.default_seconds is not None  # measured on the runner before tuning
    assert kernels_decided(cm) == {"fused_matmul_add": "tuned" if task.uses_tuned else "default"}
    with torch.no_grad():
        np.testing.assert_allclose(cm(*args).numpy(), model(*args).numpy(), rtol=1e-5, atol=1e-5)
    # a finished budget is not spent again
    again = graphopt.tune(model, args, "host", trials=TRIALS, database=db, progress=False)
    assert again.new_trials == 0


@pytest.mark.parametrize("default_s,uses", [(1e-9, "default"), (100.0, "tuned")])
def test_a_record_applies_only_where_it_beat_the_default_schedule(killed_and_resumed, tmp_path, default_s, uses):
    src, _, _ = killed_and_resumed
    db = tmp_path / "db"
    db.mkdir()
    for name in (WORKLOADS, RECORDS):
        (db / name).write_bytes((src / name).read_bytes())
    (db / DEFAULTS).write_text(json.dumps([0, default_s]) + "\n")
    model, args = _model()
    cm = graphopt.compile(model, args, "host", database=db, progress=False)
    assert kernels_decided(cm) == {"fused_matmul_add": uses}
    with torch.no_grad():
        np.testing.assert_allclose(cm(*args).numpy(), model(*args).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("faster,uses", [(0.99, "default"), (0.97, "tuned")])
def test_a_record_must_win_by_more_than_the_timing_noise(killed_and_resumed, tmp_path, faster, uses):
    """A record 1 % faster than the default schedule is within run-to-run noise: the default stays."""
    src, _, _ = killed_and_resumed
    db = tmp_path / "db"
    db.mkdir()
    for name in (WORKLOADS, RECORDS):
        (db / name).write_bytes((src / name).read_bytes())
    best = open_database(db, writable=False).best_seconds(_workload(db))
    (db / DEFAULTS).write_text(json.dumps([0, best / faster]) + "\n")
    model, args = _model()
    assert kernels_decided(graphopt.compile(model, args, "host", database=db, progress=False)) == \
        {"fused_matmul_add": uses}


def _workload(db: Path):
    """The IRModule of the database's only workload."""
    (wl,) = open_database(db, writable=False)._workloads
    return wl.mod


def test_a_paired_check_overrules_a_default_measured_under_load(killed_and_resumed, tmp_path):
    """A default schedule once measured at 1 s (a loaded stretch of the machine: stored defaults were
    10-200x too slow that way) decides only until tune's paired check times it against the best
    record in the same rounds; the check runs even when the budget is spent, and once per record set."""
    src, _, _ = killed_and_resumed
    db = tmp_path / "db"
    db.mkdir()
    for name in (WORKLOADS, RECORDS, SPENT):
        if (src / name).exists():  # no SPENT line when the killed session had measured every trial
            (db / name).write_bytes((src / name).read_bytes())
    (db / DEFAULTS).write_text(json.dumps([0, 1.0]) + "\n")
    model, args = _model()
    assert kernels_decided(graphopt.compile(model, args, "host", database=db, progress=False)) == \
        {"fused_matmul_add": "tuned"}  # the inflated default loses to any record
    summary = graphopt.tune(model, args, "host", trials=TRIALS, database=db, progress=False)
    assert summary.new_trials == 0  # the budget was spent: only the check ran
    ((idx, (default_s, tuned_s, records)),) = [json.loads(line) for line in _lines(db / PAIRED)]
    assert idx == 0 and records == TRIALS and 0 < default_s < 0.01 and 0 < tuned_s < 0.01
    (task,) = summary.tasks
    assert (task.default_seconds, task.best_seconds) == (default_s, tuned_s)
    cm = graphopt.compile(model, args, "host", database=db, progress=False)
    assert kernels_decided(cm) == {"fused_matmul_add": "tuned" if beats_default(tuned_s, default_s) else "default"}
    with torch.no_grad():
        np.testing.assert_allclose(cm(*args).numpy(), model(*args).numpy(), rtol=1e-5, atol=1e-5)
    graphopt.tune(model, args, "host", trials=TRIALS, database=db, progress=False)
    assert len(_lines(db / PAIRED)) == 1  # checked already: no new check without a new record


def test_damaged_trailing_line_is_reported_and_skipped(killed_and_resumed, tmp_path):
    src, _, _ = killed_and_resumed
    db = tmp_path / "db"
    db.mkdir()
    for name in (WORKLOADS, RECORDS):
        (db / name).write_bytes((src / name).read_bytes())
    good = _lines(db / RECORDS)
    with open(db / RECORDS, "a") as f:
        f.write(good[-1][: len(good[-1]) // 2])  # a write cut short: no newline
    ro = open_database(db, writable=False)
    assert len(ro) == len(good) and len(ro.damaged) == 1 and "truncated" in ro.damaged[0].reason
    rw = open_database(db, writable=True)  # quarantines the fragment so appends start clean
    rw.close()
    assert _lines(db / RECORDS) == good and (db / (RECORDS + ".damaged")).exists()
    with open(db / RECORDS, "a") as f:
        f.write("not json\n")
    assert len(open_database(db, writable=False).damaged) == 1
    model, args = _model()
    cm = graphopt.compile(model, args, "host", database=db, progress=False)
    assert any("skipped" in w for w in cm.report.warnings)


def test_damaged_workload_line_renumbers_records_and_trials_spent(killed_and_resumed, tmp_path):
    src, _, _ = killed_and_resumed
    db = tmp_path / "db"
    db.mkdir()
    shift = lambda line: json.dumps([json.loads(line)[0] + 1, json.loads(line)[1]], separators=(",", ":"))  # noqa: E731
    (db / WORKLOADS).write_text("damaged workload\n" + (src / WORKLOADS).read_text())
    (db / RECORDS).write_text("".join(shift(line) + "\n" for line in _lines(src / RECORDS)))
    (db / SPENT).write_text("[1,9]\n")
    rw = open_database(db, writable=True)
    rw.close()
    assert [d.file for d in rw.damaged] == [WORKLOADS]
    for name in (WORKLOADS, RECORDS):  # back to the original numbering, nothing else lost
        assert _lines(db / name) == _lines(src / name)
    assert _lines(db / SPENT) == ["[0,9]"]


def _unreadable_record(line: str, intrin: str) -> str:
    """`line` (a record line) with its trace ending in a tensorize with `intrin`."""
    idx, rec = json.loads(line)
    loop = next(rv for inst in rec[0][0] for rv in inst[3] if isinstance(rv, str) and rv.startswith("l"))
    rec[0][0].append(["Tensorize", [loop], [intrin, 1], []])
    return json.dumps([idx, rec], separators=(",", ":"))


def test_lines_tvm_cannot_rebuild_here_stay_in_the_files(killed_and_resumed, tmp_path):
    """A record naming an intrinsic no kernel in this process defines (another graphopt version's, say)
    and a workload TVM cannot load are whole lines, not damage: skipped and reported, never moved to
    *.damaged — not even when a truly damaged line makes the open rewrite the files — and the lines that
    refer to such a workload stay too; appended lines refer to workloads by their line in the file."""
    src, _, _ = killed_and_resumed
    db = tmp_path / "db"
    db.mkdir()
    shift = lambda line: json.dumps([json.loads(line)[0] + 2, json.loads(line)[1]], separators=(",", ":"))  # noqa: E731
    records = [shift(line) for line in _lines(src / RECORDS)]
    foreign = _unreadable_record(records[0], "graphopt_test_no_such_intrin")
    orphan = json.dumps([1, json.loads(records[0])[1]], separators=(",", ":"))  # its workload cannot be read
    (db / WORKLOADS).write_text("damaged workload\n" + '["0","bm90IGEgbW9kdWxl"]\n' + (src / WORKLOADS).read_text())
    (db / RECORDS).write_text("".join(line + "\n" for line in [*records, foreign, orphan]))
    ro = open_database(db, writable=False)
    assert len(ro) == len(records) and [d.file for d in ro.damaged] == [WORKLOADS]
    assert sorted(d.file for d in ro.unreadable) == sorted([WORKLOADS, RECORDS, RECORDS])
    assert any("graphopt_test_no_such_intrin" in d.reason for d in ro.unreadable), [d.reason for d in ro.unreadable]
    rw = open_database(db, writable=True)  # quarantines the damaged workload line only; renumbers the rest
    mod = rw._workloads[0].mod
    rw.mark_spent(mod, 9)
    rw.close()
    unshift = lambda line: json.dumps([json.loads(line)[0] - 1, json.loads(line)[1]], separators=(",", ":"))  # noqa: E731
    assert _lines(db / WORKLOADS) == ['["0","bm90IGEgbW9kdWxl"]', *_lines(src / WORKLOADS)]
    assert _lines(db / RECORDS) == [unshift(line) for line in [*records, foreign, orphan]]
    assert _lines(db / (WORKLOADS + ".damaged")) == ["damaged workload"]
    assert _lines(db / SPENT) == ["[1,9]"]  # the workload's line after the rewrite
    again = open_database(db, writable=False)
    assert again.trials_spent(mod) == 9 and len(again) == len(records) and not again.damaged
    assert len(again.unreadable) == 3


class _Transpose(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def test_finished_budget_is_a_no_op_even_when_the_search_ran_out_of_candidates(tmp_path):
    """A transpose has a design space of a few schedules: 6 trials give fewer than 6 records. Rerunning
    the same command used to try again and add records each time; now the budget counts as spent."""
    db, args = tmp_path / "db", (torch.randn(2, 5, 7),)
    first = graphopt.tune(_Transpose(), args, "host", trials=6, database=db, progress=False)
    (task,) = first.tasks
    assert task.planned == 6 and task.spent == 6 and 0 < task.trials < 6  # the search ran out of candidates
    files = {p.name: p.read_bytes() for p in db.iterdir() if p.is_file()}
    again = graphopt.tune(_Transpose(), args, "host", trials=6, database=db, progress=False)
    assert again.already_spent and again.new_trials == 0 and again.tasks[0].trials == task.trials
    assert "nothing to do" in again.to_markdown()
    assert {p.name: p.read_bytes() for p in db.iterdir() if p.is_file()} == files  # no record, no line added


def test_second_session_on_same_folder_is_refused(tmp_path):
    first = open_database(tmp_path / "db")
    try:
        with pytest.raises(graphopt.ConfigError, match="another tuning session"):
            open_database(tmp_path / "db")
    finally:
        first.close()


def test_local_runner_refused_for_arm_and_bad_budget():
    model, args = _model()
    with pytest.raises(graphopt.TuningError, match="emulated-icount"):
        graphopt.tune(model, args, "arm-a53", trials=2, progress=False)
    with pytest.raises(graphopt.TuningError, match="positive"):
        graphopt.tune(model, args, "host", trials=0, progress=False)


def test_c_library_targets_point_to_the_target_that_tunes_their_kernels():
    model, args = _model()
    with pytest.raises(graphopt.TuningError, match="tune for 'arm-a53' .* compile for 'arm-a53-c' with database="):
        graphopt.tune(model, args, "arm-a53-c", trials=2, runner="emulated-icount", progress=False)
    with pytest.raises(graphopt.TuningError, match="cortex-m4.* default schedules"):
        graphopt.tune(model, args, "cortex-m4", trials=2, runner="emulated-icount", progress=False)


@pytest.mark.slow
@pytest.mark.emulation
def test_emulated_icount_runner_tunes_arm_and_counts_per_kernel(tmp_path):
    from conftest import require_tools

    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import kernel_counts
    from graphopt.tuning import exported_for_tuning

    require_tools("qemu-aarch64", "aarch64-linux-gnu-g++")
    model, args = _model()
    summary = graphopt.tune(model, args, "arm-a53", trials=3, database=tmp_path / "db",
                            runner="emulated-icount", progress=False)
    assert summary.proxy and summary.tasks[0].best_seconds is not None
    cm = graphopt.compile(model, args, "arm-a53", database=tmp_path / "db", progress=False)
    (task,) = summary.tasks
    assert kernels_decided(cm) == {"fused_matmul_add": "tuned" if task.uses_tuned else "default"}
    with torch.no_grad():
        np.testing.assert_allclose(cm(*args).numpy(), model(*args).numpy(), rtol=1e-5, atol=1e-5)
    # the C library build of the same CPU applies the same records, and says so in its report
    assert kernels_decided(graphopt.compile(model, args, "arm-a53-c", database=tmp_path / "db",
                                            progress=False)) == kernels_decided(cm)
    spec = graphopt.get_target("arm-a53")
    counts = kernel_counts(lower(exported_for_tuning(model, args, spec), spec).ir_module, spec)
    assert counts["fused_matmul_add"]["instructions_per_call"] > 0
