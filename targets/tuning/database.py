"""graphopt's crash-safe MetaSchedule tuning database: one folder per target.

Layout (the same two JSON-lines files as TVM's `JSONDatabase`, which can read the folder too, and
graphopt's budget file, which it ignores):

    database_workload.json        one line per workload:  [structural hash, base64 IRModule]
    database_tuning_record.json   one line per record:    [workload line index, record]
    graphopt_trials_spent.json    one line per finished task: [workload line index, trials spent]
    graphopt_default_seconds.json one line per measurement of graphopt's default schedule of a kernel
                                  on the tuning runner: [workload line index, seconds]
    graphopt_paired_seconds.json  one line per paired check of a kernel's default schedule against its
                                  best record: [workload line index, [default s, tuned s, records then]]

A finished task's trials spent include candidates the search could not produce (a kernel with a
small design space yields fewer records than trials): `trials_spent` counts them, so running the
same budget again measures nothing.

Tuning never loses: the queries compile's ``MetaScheduleApplyDatabase`` makes return
a kernel's best record only when it measured faster than graphopt's default schedule of that kernel
on the same runner by more than the timing noise (`beats_default`); otherwise they answer "no
record", the default rules schedule the kernel, and the decision is listed in ``kept_default``.
The deciding times are the kernel's latest paired check (`mark_paired`: default and best record
timed alternately in the same rounds, made after tuning, valid while no record has been added
since), else the fastest `mark_default` measurement against the best record's. Kernels whose
default was never measured (databases from before this rule) take their best record.

Why not `JSONDatabase` itself: it appends through a buffered stream (a kill can leave half a line)
and refuses the whole file when one line is damaged. `TuningDatabase` is a `PyDatabase` over an
in-memory store that appends every committed workload/record as ONE ``write(2)`` on an
``O_APPEND`` descriptor followed by ``fsync`` — a kill -9 leaves every earlier line whole — and
on open it parses every line: damaged lines (e.g. a trailing line cut by a power loss or a full
disk) are reported in ``damaged`` and skipped, never fatal. A writable open also moves such lines
to ``<file>.damaged`` (rewriting the file atomically), so new lines never join a broken one.
A whole line TVM cannot rebuild in this process (a record replaying a tensor intrinsic no kernel
here defines, e.g. from another graphopt version) is not damage: it is listed in ``unreadable``,
skipped, and stays in the file, as do the lines that refer to its workload. Before parsing a record
the database registers the tensor intrinsics its trace names (`kernels.register_intrinsic`): a
process that has compiled nothing yet reads tuned int8 kernels too (it used to skip every one).

Refuses (`TuningDatabaseError`): a path that is a file or lies under one, a folder that cannot be
created or written (`check_folder` probes it before any tuning work), a folder that another tuning
session has open for writing (an exclusive ``flock`` on ``.lock``), a read-only open of a missing
folder.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphopt.errors import TuningDatabaseError

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
SPENT = "graphopt_trials_spent.json"
DEFAULTS = "graphopt_default_seconds.json"
PAIRED = "graphopt_paired_seconds.json"
_LOCK = ".lock"

# A record replaces graphopt's default schedule only when it measured at least this much faster:
# paired timings of one kernel differ by 1-2 % from run to run, and a record taken on a smaller win is
# a coin flip (ResNet-20 int8, 1 thread: 7 of the 12 records a 64-trial session applied had won by <= 1 %).
MARGIN = 0.02


def beats_default(tuned_s: float | None, default_s: float | None) -> bool:
    """Whether a kernel's best record (``tuned_s``) is used over its default schedule (``default_s``;
    None: never measured, the record is used)."""
    return tuned_s is not None and (default_s is None or tuned_s < default_s * (1 - MARGIN))


@dataclass(frozen=True)
class Damage:
    """One line of a database file that could not be read (skipped)."""

    file: str
    line: int  # 1-based
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class _Unreadable(Exception):
    """A well-formed line whose object TVM cannot rebuild in this process: skipped, never quarantined."""


def _rebuilt(build: Callable[[], Any]) -> Any:
    """``build()``, its failure raised as `_Unreadable` (the line itself parsed)."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001  TVM deserialization raises many types
        raise _Unreadable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}") from exc


def _tensor_intrinsics(record_json) -> set[str]:
    """Names of the tensor intrinsics a serialized record's trace tensorizes with."""
    try:
        return {inst[2][0] for inst in record_json[0][0]
                if inst[0] == "Tensorize" and inst[2] and isinstance(inst[2][0], str)}
    except (TypeError, IndexError, KeyError):
        return set()  # not a trace: the record's own parse reports it


def check_folder(folder, *, writable: bool = True) -> Path:
    """`TuningDatabaseError` unless `folder` can be opened as asked; writes nothing that stays.

    A writable folder is probed by creating and removing a temporary folder in it (or in its
    nearest existing parent): permission bits say nothing for root, /proc or read-only mounts.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TuningDatabaseError(f"database must be a folder path (str or Path), got {type(folder).__name__}")
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise TuningDatabaseError(f"tuning database {folder} is a file; give a folder, e.g. tuning/host/")
    if not writable:
        if not folder.is_dir():
            raise TuningDatabaseError(f"tuning database {folder} does not exist; run graphopt.tune first")
        return folder
    parent = folder.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise TuningDatabaseError(f"tuning database {folder} lies under {parent}, which is a file; "
                                  "give a folder path, e.g. tuning/host/")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".graphopt-probe-", dir=parent))
    except OSError as exc:
        raise TuningDatabaseError(f"tuning database {folder} cannot be written ({exc.strerror} in {parent}); "
                                  "pass database= a folder you can write, e.g. tuning/host/") from None
    return folder


def _append(path: Path, obj) -> None:
    """Append `obj` as one JSON line, durably: one write on O_APPEND, then fsync."""
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # a regular-file write is whole unless the disk fills; finish it if not
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_lines(path: Path, parse: Callable[[Any], Any], damaged: list[Damage],
                unreadable: list[Damage]) -> list[tuple[int, Any, str]]:
    """(line number, parsed value, raw line) for each line `parse` accepts; the rest go to `damaged`, or
    to `unreadable` when `parse` raised `_Unreadable`."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    good = []
    for i, line in enumerate(lines, 1):
        if i == len(lines) and not line:
            break  # the newline that ends the last line
        text = line.decode("utf-8", "replace")
        if i == len(lines):
            damaged.append(Damage(path.name, i, "truncated last line (no newline): an interrupted write"))
            continue
        try:
            good.append((i, parse(json.loads(text)), text))
        except _Unreadable as exc:
            unreadable.append(Damage(path.name, i, str(exc)))
        except Exception as exc:  # noqa: BLE001  not JSON, or not the line's shape: the line is damaged
            message = str(exc).splitlines()[0][:160] if str(exc) else ""
            damaged.append(Damage(path.name, i, f"{type(exc).__name__}: {message}"))
    return good


def _quarantine(path: Path, bad_numbers: set[int], renumber: dict[int, int] | None = None) -> None:
    """Move lines `bad_numbers` (1-based) of `path` to `<path>.damaged` and rewrite the rest atomically,
    their workload index mapped through `renumber` when given."""
    lines = path.read_bytes().split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last line
    with open(path.with_name(path.name + ".damaged"), "ab") as f:
        for n in sorted(bad_numbers):
            f.write(lines[n - 1] + b"\n")
        f.flush()
        os.fsync(f.fileno())
    keep = [line.decode() for n, line in enumerate(lines, 1) if n not in bad_numbers]
    if renumber is not None:
        keep = [json.dumps([renumber[json.loads(t)[0]], json.loads(t)[1]], separators=(",", ":")) for t in keep]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _make_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class TuningDatabase(ms.database.PyDatabase):
        """See the module docstring. ``damaged``: corrupt lines skipped on open; ``unreadable``: whole
        lines skipped because TVM cannot rebuild them here (kept in the files); ``folder``; ``writable``."""

        def __init__(self, folder, writable: bool = True):
            import tvm_ffi

            self.folder = check_folder(folder, writable=writable)
            self.writable = writable
            self.damaged: list[Damage] = []
            self.unreadable: list[Damage] = []
            self._mem = ms.database.MemoryDatabase(module_equality="structural")
            self._workloads: list = []  # workload index -> Workload (in self._mem); `_line_of` gives its line
            self._by_hash: dict[int, list[int]] = {}
            self._record_counts: dict[int, int] = {}
            self._spent: dict[int, int] = {}  # workload index -> trials a finished session spent on it
            self._default: dict[int, float] = {}  # workload index -> fastest default-schedule measurement
            self._paired: dict[int, tuple[float, float, int]] = {}  # index -> latest (default s, tuned s, records)
            self.kept_default: list[dict] = []  # queries answered "keep the default": {kernel, tuned_s, default_s}
            self._lock_fd = None
            if writable:
                try:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    self._lock_fd = os.open(self.folder / _LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
                except OSError as exc:
                    raise TuningDatabaseError(f"tuning database {self.folder} cannot be written ({exc}); pass "
                                              "database= a folder you can write, e.g. tuning/host/") from None
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(self._lock_fd)
                    raise TuningDatabaseError(f"another tuning session is writing {self.folder}; wait for it "
                                              "or tune into another folder") from None
            self._ffi = tvm_ffi
            self._load()

        # ---------------------------------------------------------------- loading
        def _load(self) -> None:
            from graphopt.targets.lowering.kernels import register_intrinsic

            wl_path = self.folder / WORKLOADS
            wl_damage: list[Damage] = []
            wl_unreadable: list[Damage] = []
            workloads = _read_lines(wl_path, lambda obj: _rebuilt(lambda: ms.database.Workload.from_json(obj)),
                                    wl_damage, wl_unreadable)
            index_of_line = {}
            for line_no, wl, _ in workloads:
                index_of_line[line_no - 1] = self._add_workload(wl.mod)
            unreadable_lines = {d.line - 1 for d in wl_unreadable}

            def indexed(parse_value):
                def parse(obj):
                    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)):
                        raise ValueError("not a [workload index, value] pair")
                    if obj[0] in unreadable_lines:
                        raise _Unreadable(f"refers to workload line {obj[0] + 1}, which cannot be read here")
                    if obj[0] not in index_of_line:
                        raise ValueError(f"refers to workload line {obj[0] + 1}, which is missing or damaged")
                    idx = index_of_line[obj[0]]
                    return idx, parse_value(obj[1], idx)
                return parse

            def record(value, idx):
                for name in _tensor_intrinsics(value):
                    register_intrinsic(name)  # a record replays its tensorize: the intrinsic must exist first
                return _rebuilt(lambda: ms.database.TuningRecord.from_json(value, self._workloads[idx]))

            def trials(value, _idx):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"trials spent {value!r} is not a count")
                return value

            def seconds(value, _idx):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
                    raise ValueError(f"default schedule time {value!r} is not a positive number of seconds")
                return float(value)

            def paired(value, _idx):
                if not (isinstance(value, list) and len(value) == 3):
                    raise ValueError(f"paired check {value!r} is not [default s, tuned s, records]")
                return seconds(value[0], _idx), seconds(value[1], _idx), trials(value[2], _idx)

            self.damaged = list(wl_damage)
            self.unreadable = list(wl_unreadable)
            files: dict[str, tuple[Path, list[tuple[int, Any, str]], list[Damage]]] = {}  # name -> lines, damage
            for name, parse_value in ((RECORDS, record), (SPENT, trials), (DEFAULTS, seconds), (PAIRED, paired)):
                damage: list[Damage] = []
                lines = _read_lines(self.folder / name, indexed(parse_value), damage, self.unreadable)
                files[name] = (self.folder / name, lines, damage)
                self.damaged += damage
            for _, (idx, rec), _ in files[RECORDS][1]:
                self._mem.commit_tuning_record(rec)
                self._record_counts[idx] = self._record_counts.get(idx, 0) + 1
            for _, (idx, n), _ in files[SPENT][1]:
                self._spent[idx] = max(self._spent.get(idx, 0), n)
            for _, (idx, secs), _ in files[DEFAULTS][1]:
                self._default[idx] = min(self._default.get(idx, secs), secs)
            for _, (idx, check), _ in files[PAIRED][1]:
                self._paired[idx] = check  # the latest check wins
            # the workload file's lines that stay (read here or not), in order: their index in the file
            staying = sorted(index_of_line.keys() | unreadable_lines)
            renumber = {old: new for new, old in enumerate(staying)}
            if self.writable and self.damaged:
                # rewrite so that appended lines start clean; workload indices are renumbered densely
                if wl_damage:
                    _quarantine(wl_path, {d.line for d in wl_damage})
                for path, _, damage in files.values():
                    if (damage or wl_damage) and path.exists():
                        _quarantine(path, {d.line for d in damage}, renumber if wl_damage else None)
            line_of = renumber if self.writable and wl_damage else {line: line for line in staying}
            # workload index -> its line in the workload file (appends refer to workloads by line);
            # a duplicated workload is referred to by its first line
            self._line_of: dict[int, int] = {}
            for line, idx in sorted(index_of_line.items()):
                self._line_of.setdefault(idx, line_of[line])
            self._lines = len(staying) if self.writable and wl_damage else \
                len(workloads) + len(wl_damage) + len(wl_unreadable)  # lines in the workload file now

        def _add_workload(self, mod) -> int:
            wl = self._mem.commit_workload(mod)
            h = self._ffi.structural_hash(mod)
            for idx in self._by_hash.get(h, []):
                if self._ffi.structural_equal(self._workloads[idx].mod, mod):
                    return idx
            self._workloads.append(wl)
            self._by_hash.setdefault(h, []).append(len(self._workloads) - 1)
            return len(self._workloads) - 1

        def _index(self, mod) -> int | None:
            h = self._ffi.structural_hash(mod)
            for idx in self._by_hash.get(h, []):
                if self._ffi.structural_equal(self._workloads[idx].mod, mod):
                    return idx
            return None

        # ---------------------------------------------------------------- graphopt queries
        def records_for(self, mod) -> int:
            """Records committed for the workload `mod` (trials already spent on it)."""
            idx = self._index(mod)
            return 0 if idx is None else self._record_counts.get(idx, 0)

        def trials_spent(self, mod) -> int:
            """Trials counted against a budget for `mod`: its records, or more when a finished session
            spent trials the search could not turn into new records (`mark_spent`)."""
            idx = self._index(mod)
            return 0 if idx is None else max(self._record_counts.get(idx, 0), self._spent.get(idx, 0))

        def mark_spent(self, mod, trials: int) -> None:
            """Record durably that a session finished tuning `mod` to `trials` trials."""
            idx = self._workload_index(mod)
            if self.writable:
                _append(self.folder / SPENT, [self._line_of[idx], int(trials)])
            self._spent[idx] = max(self._spent.get(idx, 0), int(trials))

        def default_seconds(self, mod) -> float | None:
            """The fastest measurement of graphopt's default schedule of `mod` (None: never measured)."""
            idx = self._index(mod)
            return None if idx is None else self._default.get(idx)

        def mark_default(self, mod, seconds: float) -> None:
            """Record durably a measurement of graphopt's default schedule of `mod` on the tuning runner."""
            idx = self._workload_index(mod)
            if self.writable:
                _append(self.folder / DEFAULTS, [self._line_of[idx], float(seconds)])
            self._default[idx] = min(self._default.get(idx, seconds), float(seconds))

        def paired_seconds(self, mod) -> tuple[float, float] | None:
            """(default s, best record s) from `mod`'s latest paired check, None if it has none or a
            record was added after it."""
            idx = self._index(mod)
            if idx is None or idx not in self._paired or self._paired[idx][2] != self._record_counts.get(idx, 0):
                return None
            return self._paired[idx][0], self._paired[idx][1]

        def mark_paired(self, mod, default_s: float, tuned_s: float) -> None:
            """Record durably a paired check of `mod`'s default schedule against its best record."""
            idx = self._workload_index(mod)
            check = (float(default_s), float(tuned_s), self._record_counts.get(idx, 0))
            if self.writable:
                _append(self.folder / PAIRED, [self._line_of[idx], list(check)])
            self._paired[idx] = check

        def best_seconds(self, mod) -> float | None:
            idx = self._index(mod)
            if idx is None:
                return None
            top = self._mem.get_top_k(self._workloads[idx], 1)
            return float(top[0].run_secs[0]) if top and top[0].run_secs else None

        def close(self) -> None:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

        # ---------------------------------------------------------------- PyDatabase
        def has_workload(self, mod) -> bool:
            return self._mem.has_workload(mod)

        def _workload_index(self, mod) -> int:
            """The index of `mod`'s workload, committed (durably) first if it is new."""
            idx = self._index(mod)
            if idx is None:
                idx = self._add_workload(mod)
                self._line_of[idx] = self._lines
                self._lines += 1
                if self.writable:
                    _append(self.folder / WORKLOADS, self._workloads[idx].as_json())
            return idx

        def commit_workload(self, mod):
            return self._workloads[self._workload_index(mod)]

        def commit_tuning_record(self, record) -> None:
            idx = self._workload_index(record.workload.mod)
            rec = ms.database.TuningRecord(record.trace, self._workloads[idx], record.run_secs, record.target,
                                           record.args_info)
            if self.writable:
                _append(self.folder / RECORDS, [self._line_of[idx], rec.as_json()])
            self._mem.commit_tuning_record(rec)
            self._record_counts[idx] = self._record_counts.get(idx, 0) + 1

        def get_top_k(self, workload, top_k: int):
            idx = self._index(workload.mod)
            return [] if idx is None else self._mem.get_top_k(self._workloads[idx], top_k)

        def get_all_tuning_records(self):
            return self._mem.get_all_tuning_records()

        def _keeps_default(self, mod, workload_name) -> bool:
            """True when `mod`'s default schedule measured at least as fast as its best record (in the
            latest paired check if it is still valid, else in their own measurements)."""
            paired = self.paired_seconds(mod)
            default, tuned = paired if paired is not None else (self.default_seconds(mod), self.best_seconds(mod))
            if tuned is None or beats_default(tuned, default):
                return False
            if not any(k["kernel"] == workload_name for k in self.kept_default):
                self.kept_default.append({"kernel": workload_name, "tuned_s": tuned, "default_s": default})
            return True

        def query_tuning_record(self, mod, target, workload_name):
            return None if self._keeps_default(mod, workload_name) else \
                self._mem.query_tuning_record(mod, target, workload_name)

        def query_schedule(self, mod, target, workload_name):
            return None if self._keeps_default(mod, workload_name) else \
                self._mem.query_schedule(mod, target, workload_name)

        def query_ir_module(self, mod, target, workload_name):
            return None if self._keeps_default(mod, workload_name) else \
                self._mem.query_ir_module(mod, target, workload_name)

        def __len__(self) -> int:
            return len(self._mem)

    return TuningDatabase


_CLASS = None


def open_database(folder, *, writable: bool = True):
    """Open (creating when writable) the tuning database in `folder`; see the module docstring."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS(folder, writable)
