"""Fuzz: seeded random CNNs (tests/fuzzgen.py) through compile (host), prune→compile and quantize→compile, with
the oracles of tests/fuzz_check.py.

Default run: seeds 0–199, every regression seed and kept case (tests/fuzz_regressions.py), CHUNK per test: one float
build checks the original and the pruned graphs, one quantized build the QDQ graphs. Nightly (slow): seeds
10000–10999, or ``GRAPHOPT_FUZZ_SEEDS=start:stop``. A seed that fails anywhere goes into the regression list and
stays there; a failure message says whether it is known, and its cause.
"""
from __future__ import annotations

import os

import pytest
import torch
from fuzz_check import Failure, check_compile_and_prune, check_quantize
from fuzz_regressions import KEPT_CASES, REGRESSIONS
from fuzzgen import Case, FuzzNet, case

CHUNK = 25
DEFAULT_SEEDS = sorted(set(range(200)) | {r.seed for r in REGRESSIONS if r.seed >= 0})
start, stop = map(int, os.environ.get("GRAPHOPT_FUZZ_SEEDS", "10000:11000").split(":"))
NIGHTLY_SEEDS = [s for s in range(start, stop) if s not in DEFAULT_SEEDS]


def _chunks(cases: list[Case], size: int = CHUNK) -> list[list[Case]]:
    """Consecutive chunks of about ``size`` cases (one TVM build per path each)."""
    k = max(1, round(len(cases) / size))
    return [cases[i * len(cases) // k:(i + 1) * len(cases) // k] for i in range(k)]


def _ids(chunks: list[list[Case]]) -> list[str]:
    return [f"seeds{c[0].seed}..{c[-1].seed}" for c in chunks]


DEFAULT = _chunks([case(s) for s in DEFAULT_SEEDS] + list(KEPT_CASES))
NIGHTLY = _chunks([case(s) for s in NIGHTLY_SEEDS], 50)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Eager references and pruning run single-threaded: tiny convs on a shared machine spin otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _verdict(failures: list[Failure]) -> None:
    known = {(r.seed, r.path): r.cause for r in REGRESSIONS}
    lines = [f"{f}\n    " + (f"known: {known[f.seed, f.path]}" if (f.seed, f.path) in known else
                              f"NEW: add it to tests/fuzz_regressions.py; reduce it with `python tests/fuzz_check.py "
                              f"{f.path} {f.seed}`") for f in failures]
    assert not failures, f"{len(failures)} fuzz failure(s):\n" + "\n".join(lines)


def test_generator_covers_the_promised_layers_and_is_reproducible():
    """The generator itself: 3–48 channels, odd sizes, the layers the suite promises across the default seeds, and
    a seed always gives the same weights, statistics and inputs (the regression list depends on it)."""
    seen, channels = set(), set()
    for seed in range(200):
        c = case(seed)
        model = FuzzNet(c.cin, c.size, c.blocks, c.head, c.classes).eval()
        with torch.no_grad():
            y = model(c.inputs())
        assert tuple(y.shape[1:]) == model.out_shape
        assert 3 <= c.cin <= 16 and (c.size[0] % 2 or c.size[1] % 2)
        for m in model.modules():
            seen.add(type(m).__name__)
            if isinstance(m, torch.nn.Conv2d):
                channels.add(m.out_channels)
                seen.update({f"k{m.kernel_size[0]}", f"stride{m.stride[0]}"})
                seen.add("depthwise" if m.groups == m.in_channels > 1 else "grouped" if m.groups > 1 else "dense")
            seen.update({"inplace"} if getattr(m, "inplace", False) else set())
            seen.update({"out += x"} if getattr(m, "in_place_add", False) else set())
    want = {"Sequential", "Conv2d", "BatchNorm2d", "ReLU", "ReLU6", "Hardswish", "SiLU", "GELU", "MaxPool2d",
            "AvgPool2d", "AdaptiveAvgPool2d", "Linear", "Residual", "InvertedResidual", "Concat", "SqueezeExcite",
            "ChannelShuffle", "k1", "k3", "k5", "stride2", "depthwise", "grouped", "inplace", "out += x"}
    assert want <= seen, want - seen
    assert min(channels) <= 3 and max(channels) >= 48
    a, b = case(7).model().state_dict(), case(7).model().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(case(7).inputs(), case(7).inputs())
    assert not torch.equal(case(7).inputs(1, 1), case(7).inputs(1, 2))


@pytest.mark.parametrize("cases", DEFAULT, ids=_ids(DEFAULT))
def test_compile_and_prune(cases):
    _verdict(check_compile_and_prune(cases))


@pytest.mark.parametrize("cases", DEFAULT, ids=_ids(DEFAULT))
def test_quantize(cases):
    _verdict(check_quantize(cases))


@pytest.mark.slow
@pytest.mark.parametrize("cases", NIGHTLY, ids=_ids(NIGHTLY))
def test_nightly_compile_and_prune(cases):
    _verdict(check_compile_and_prune(cases))


@pytest.mark.slow
@pytest.mark.parametrize("cases", NIGHTLY, ids=_ids(NIGHTLY))
def test_nightly_quantize(cases):
    _verdict(check_quantize(cases))
