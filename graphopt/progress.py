"""Progress: graphopt's one way of saying what it is doing — log records and tqdm bars.

    with progress.shown(True):                       # what compile(progress=...) does for its duration
        with progress.phase("capture", timings=t):   # "capture ..." then "capture done in 0.42 s"; t["capture"]
            ...
        for batch in progress.bar(data, total, "epoch 1/3"):   # a tqdm bar while progress is shown
            ...

Messages are INFO records on the ``graphopt`` logger (modules log on its children, e.g.
``graphopt.targets.backends.emulation``), so a script or notebook that configures logging gets
them where it routes logs. `shown(True)` makes them visible for its duration: it lowers the
logger's level to INFO and, only when no handler anywhere would display them (a plain script, the
CLI, a notebook), attaches one writing ``[graphopt] message`` lines to stderr. `shown(False)`
silences graphopt's INFO records and bars for its duration. Nested calls restore what they found.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

LOG = logging.getLogger("graphopt")
T = TypeVar("T")


@contextlib.contextmanager
def shown(enabled: bool) -> Iterator[None]:
    """graphopt's INFO records (and bars) visible (``enabled``) or silenced, for the duration."""
    level = LOG.level
    handler = None
    if enabled:
        if LOG.getEffectiveLevel() > logging.INFO:
            LOG.setLevel(logging.INFO)
        if not LOG.hasHandlers():
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("[graphopt] %(message)s"))
            LOG.addHandler(handler)
    else:
        LOG.setLevel(logging.WARNING)
    try:
        yield
    finally:
        if handler is not None:
            LOG.removeHandler(handler)
        LOG.setLevel(level)


def visible() -> bool:
    """True when graphopt's INFO records are shown (inside `shown(True)` or logging set to INFO)."""
    return LOG.isEnabledFor(logging.INFO)


@contextlib.contextmanager
def phase(name: str, detail: str = "", timings: dict[str, float] | None = None,
          log: logging.Logger = LOG) -> Iterator[None]:
    """Log the start and the duration of a phase; add its seconds to ``timings[name]``."""
    log.info("%s%s ...", name, f" {detail}" if detail else "")
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + seconds
        log.info("%s done in %.2f s", name, seconds)


def bar(items: Iterable[T], total: int | None, desc: str) -> Iterable[T]:
    """``items`` with a tqdm progress bar while progress is shown (`visible`), else ``items`` itself."""
    if not visible():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
