"""The C library's arena plan (`graphopt.targets.backends.memory_plan`): blocks live at the same call never
overlap, the arena is never below the peak-live bound, it reaches the bound on chains and residual
blocks (the shapes of CNNs), and on small random problems it is as small as the best placement
order found by exhaustive search. The zoo models' arenas against their bounds are checked where
they are built (tests/test_embedded.py)."""
from __future__ import annotations

import itertools
import random

import pytest

from graphopt.targets.backends.memory_plan import Block, _place, live_bytes, plan


def _check_valid(blocks, p):
    for a, b in itertools.combinations(blocks, 2):
        if a.first <= b.last and b.first <= a.last:  # live together: disjoint bytes
            oa, ob = p.offsets[a.key], p.offsets[b.key]
            assert oa + a.size <= ob or ob + b.size <= oa, (a, b, oa, ob)
    assert all(p.offsets[b.key] + b.size <= p.arena_bytes for b in blocks)
    assert p.arena_bytes >= p.lower_bound == max(live_bytes(blocks, p_calls(blocks)))


def p_calls(blocks):
    return max(b.last for b in blocks) + 1


def test_bound_is_the_largest_live_sum():
    blocks = [Block("a", 0, 2, 64), Block("b", 1, 1, 128), Block("c", 2, 3, 192), Block("ws", 1, 1, 64)]
    assert live_bytes(blocks, 4) == [64, 256, 256, 192]
    assert plan(blocks, 4).lower_bound == 256


def test_residual_block_reaches_the_bound():
    # x -> pad -> conv -> pad -> conv -> add(x): the shortcut x lives across both convs, the padded
    # copies are bigger than the tensors, the first conv needs a workspace
    x, pad, y, ws = 16384, 18496, 16384, 4672
    blocks = [Block("x", 0, 5, x), Block("p1", 1, 2, pad), Block("ws", 2, 2, ws), Block("y1", 2, 3, y),
              Block("p2", 3, 4, pad), Block("y2", 4, 5, y), Block("out", 5, 6, x)]
    p = plan(blocks, 7)
    _check_valid(blocks, p)
    assert p.lower_bound == x + pad + y + ws and p.arena_bytes == p.lower_bound and p.gap_bytes == 0


def test_chain_of_shrinking_layers_reaches_the_bound():
    sizes = [4096, 8192, 8192, 4096, 4096, 2048, 1024, 64]
    blocks = [Block(i, i, i + 1, s) for i, s in enumerate(sizes)]
    p = plan(blocks, len(sizes) + 1)
    _check_valid(blocks, p)
    assert p.arena_bytes == p.lower_bound == 16384


@pytest.mark.parametrize("seed", range(40))
def test_random_problems_are_valid_and_as_good_as_exhaustive_search(seed):
    rng = random.Random(seed)
    n, calls = rng.randint(2, 6), rng.randint(2, 8)
    blocks = []
    for i in range(n):
        first = rng.randrange(calls)
        blocks.append(Block(i, first, rng.randint(first, calls - 1), 64 * rng.randint(1, 8)))
    p = plan(blocks, calls)
    _check_valid(blocks, p)
    best = min(_place(list(order), fit)[1] for order in itertools.permutations(blocks) for fit in (False, True))
    assert p.arena_bytes <= best


def test_empty_plan():
    p = plan([], 3)
    assert p.arena_bytes == p.lower_bound == 0 and p.live_bytes == (0, 0, 0)
