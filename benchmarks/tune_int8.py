"""Tune an int8 zoo model's kernels on the host (the tensorized dot kernels over their register
tiles and loop orders, the rest by MetaSchedule), then time the tuned artifact against the untuned
one call by call: the paired per-round ratio tuned/untuned (never above 1 beyond noise: compile keeps
the default schedule of every kernel no record beat). Outputs are checked bit for bit first.

    python benchmarks/tune_int8.py --model residual_cnn --trials 400 --per-kernel 40
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import graphopt
from graphopt.zoo import ZOO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="residual_cnn", choices=sorted(ZOO))
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--per-kernel", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--db", help="tuning database folder (default: a fresh temporary one)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, (x,) = ZOO[args.model].factory()
    q = graphopt.quantize(model.eval(), (x,), [(torch.randn_like(x),) for _ in range(4)])
    db = args.db or tempfile.mkdtemp(prefix="graphopt-tune-int8-")
    start = time.perf_counter()
    summary = graphopt.tune(q, (x,), "host", trials=args.trials, trials_per_task=args.per_kernel, database=db)
    print(summary.to_markdown())
    print(f"tuning took {time.perf_counter() - start:.0f} s")
    untuned = graphopt.compile(q, (x,), "host", progress=False)
    tuned = graphopt.compile(q, (x,), "host", database=db, progress=False)
    print(f"tuned kernels applied: {len(tuned.report.lowering['from_database'])}, "
          f"defaults kept: {len(tuned.report.lowering['default_kept'])}")
    for i in range(3):
        xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        assert torch.equal(tuned(xi), untuned(xi)), "tuned and untuned outputs differ"
    ratios = []
    for _ in range(args.rounds):
        a = time.perf_counter()
        untuned(x)
        b = time.perf_counter()
        tuned(x)
        ratios.append((time.perf_counter() - b) / (b - a))
    print(f"tuned/untuned latency, paired median over {args.rounds} rounds: {statistics.median(ratios):.3f} "
          f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
