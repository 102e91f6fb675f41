"""Structured pruning benchmark: a ResNet-18-sized model pruned to 50 % MACs vs. unpruned.

Host: both compiled with `graphopt.compile(..., "host")` at 224×224 (channels rounded to the host's
``channel_multiple``), median latency timed alternately call by call in one process, and the ratio.
aarch64: both compiled with ``target="arm"`` (channel multiple 4) and measured by the compile
report's QEMU instruction count (`report.instructions_per_inference`). Emulating a 224×224
ResNet-18 takes seconds per inference, so the aarch64 count uses ``--arm-size`` (default 64×64).
Random weights (BatchNorm statistics recalibrated); the numbers are about speed, not accuracy.

Usage: python benchmarks/prune.py [--runs 30] [--target-macs 0.5] [--arm-size 64] [--skip-arm]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import graphopt
from graphopt.zoo import ResNet18, recalibrate_bn


def _median_ms(fns: dict, runs: int, warmup: int = 3) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _model(size: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    x = (torch.randn(1, 3, size, size),)
    return recalibrate_bn(ResNet18(), x, steps=2), x


def _pruned(model, x, fraction: float, target: str) -> tuple[nn.Module, dict]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", graphopt.GraphoptWarning)
        small = graphopt.prune(model, x, target_macs=fraction, target=target)
    r = small.graphopt_pruning
    return small, {"macs": (r.macs_before, r.macs_after), "params": (r.params_before, r.params_after),
                   "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--arm-size", type=int, default=64)
    ap.add_argument("--skip-arm", action="store_true")
    args = ap.parse_args()

    model, x = _model(224)
    small, info = _pruned(model, x, args.target_macs, "host")
    (mb, ma), (pb, pa) = info["macs"], info["params"]
    print(f"host prune: MACs {mb / 1e9:.3f} G -> {ma / 1e9:.3f} G ({ma / mb:.3f}), params {pb / 1e6:.2f} M -> "
          f"{pa / 1e6:.2f} M ({pa / pb:.3f}), channel_multiple {graphopt.get_target('host').channel_multiple}, "
          f"prune took {info['seconds']:.1f} s", flush=True)
    dense_cm = graphopt.compile(model, x, "host", progress=False)
    small_cm = graphopt.compile(small, x, "host", progress=False)
    ms = _median_ms({"unpruned": lambda: dense_cm(*x), "pruned": lambda: small_cm(*x)}, args.runs)
    print(f"host latency (224x224, median of {args.runs}): unpruned {ms['unpruned']:.2f} ms, pruned "
          f"{ms['pruned']:.2f} ms, ratio pruned/unpruned {ms['pruned'] / ms['unpruned']:.3f}", flush=True)

    if args.skip_arm:
        return
    model, x = _model(args.arm_size)
    small, info = _pruned(model, x, args.target_macs, "arm")
    (mb, ma) = info["macs"]
    counts = {}
    for name, m in (("unpruned", model), ("pruned", small)):
        cm = graphopt.compile(m, x, "arm", progress=False)
        counts[name] = cm.report.instructions_per_inference
        if counts[name] is None:
            print(f"aarch64 {name}: instructions not measured ({cm.report.instructions_note})")
            return
    print(f"aarch64 ({args.arm_size}x{args.arm_size}, qemu -cpu {graphopt.get_target('arm').qemu_cpu}, "
          f"channel_multiple 4): MACs {mb / 1e6:.1f} M -> {ma / 1e6:.1f} M ({ma / mb:.3f}); instructions/inference "
          f"unpruned {counts['unpruned'] / 1e6:.1f} M, pruned {counts['pruned'] / 1e6:.1f} M, ratio "
          f"{counts['pruned'] / counts['unpruned']:.3f}", flush=True)


if __name__ == "__main__":
    main()
