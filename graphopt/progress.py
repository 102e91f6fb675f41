"""Timed, optionally printed phases: ``with steps.phase("capture"): ...`` records seconds."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Steps:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.timings: dict[str, float] = {}

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[graphopt] {message}", file=self.stream, flush=True)

    @contextmanager
    def phase(self, name: str, detail: str = ""):
        self.say(f"{name}{' ' + detail if detail else ''} ...")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.timings[name] = self.timings.get(name, 0.0) + dt
            self.say(f"{name} done in {dt:.2f} s")
