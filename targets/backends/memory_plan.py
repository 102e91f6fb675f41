"""Static arena plan for the runtime-free C library: every activation and every kernel workspace
gets an offset in one arena, measured against the peak-live lower bound.

A block is live over an interval of kernel calls: an activation from the call that first names
it to the last call that reads it (to the end for a model output kept in the arena), a kernel's
workspace (its LIFO peak) during its own call only. Two blocks live at the same call never
overlap (kernels do not compute in place). The lower bound is the largest sum of live sizes over
calls, sizes rounded up to the alignment: no plan keeping every live block whole and unaliased
uses less. `plan` places the blocks greedily under several orders (largest first, longest-lived
first, earliest first; lowest fitting offset or tightest fitting gap: the heuristics of TFLite
Micro and ONNX Runtime), keeps the smallest arena, and when that is above the bound tries seeded
random orders for a bounded number of rounds. A remaining gap is reported (`Plan.gap_bytes`),
never hidden. Refuses nothing.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

_RANDOM_ROUNDS = 200  # extra orders tried when the heuristics leave a gap (each is O(n^2), n = blocks)


@dataclass(frozen=True)
class Block:
    key: object  # the caller's handle (a tensor index, or ("workspace", call))
    first: int  # first call it is live at
    last: int  # last call it is live at (inclusive)
    size: int  # bytes, already rounded to the alignment


@dataclass(frozen=True)
class Plan:
    offsets: dict  # Block.key -> byte offset
    arena_bytes: int
    lower_bound: int  # max over calls of the live bytes
    live_bytes: tuple[int, ...]  # per call
    strategy: str  # the order that gave the arena

    @property
    def gap_bytes(self) -> int:
        return self.arena_bytes - self.lower_bound


def live_bytes(blocks: list[Block], calls: int) -> list[int]:
    live = [0] * max(calls, 1)
    for b in blocks:
        for k in range(b.first, b.last + 1):
            live[k] += b.size
    return live


def _place(order: list[Block], best_fit: bool) -> tuple[dict, int]:
    placed: list[tuple[int, int, Block]] = []  # (offset, end, block)
    offsets, top = {}, 0
    for b in order:
        busy = sorted((o, e) for o, e, p in placed if p.first <= b.last and b.first <= p.last)
        at = 0
        gaps: list[tuple[float, int]] = []  # (size, offset)
        for o, e in busy:
            if o - at >= b.size:
                gaps.append((o - at, at))
            at = max(at, e)
        gaps.append((float("inf"), at))  # above everything live at the same time
        offset = min(gaps)[1] if best_fit else min(g[1] for g in gaps)
        offsets[b.key] = offset
        placed.append((offset, offset + b.size, b))
        top = max(top, offset + b.size)
    return offsets, top


_ORDERS = {
    "largest first": lambda b: (-b.size, b.first, -(b.last - b.first)),
    "longest-lived first": lambda b: (-(b.last - b.first), -b.size, b.first),
    "earliest first": lambda b: (b.first, -b.size),
    "largest area first": lambda b: (-b.size * (b.last - b.first + 1), b.first),
}


def plan(blocks: list[Block], calls: int) -> Plan:
    """Offsets for `blocks` over `calls` kernel calls; see the module docstring."""
    live = live_bytes(blocks, calls)
    bound = max(live, default=0)
    candidates = [(*_place(sorted(blocks, key=key), best_fit),
                   f"{name}, {'tightest gap' if best_fit else 'lowest offset'}")
                  for name, key in _ORDERS.items() for best_fit in (False, True)]
    best = min(candidates, key=lambda c: c[1])  # the first of the smallest, as the orders are listed
    rng = random.Random(0)
    order = list(blocks)
    for _ in range(_RANDOM_ROUNDS if best[1] > bound else 0):
        rng.shuffle(order)
        offsets, size = _place(order, True)
        if size < best[1]:
            best = (offsets, size, "seeded random order, tightest gap")
        if size == bound:
            break
    offsets, size, strategy = best
    return Plan(offsets, size, bound, tuple(live), strategy)
