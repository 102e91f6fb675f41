"""Compile time: cold (a fresh process: imports, first TVM use), warm (the same process again) and
cached (an identical build found in graphopt's build cache), per model and target.

Each model runs in its own fresh Python process, which compiles three times:
  cold    the first compile in the process, build cache off (what a CI job that starts Python pays);
  warm    the same compile again, cache off (TVM imported, the intrinsics its layers use registered);
  cached  the same compile with the build cache on, after a build stored it (embedded pipelines
          that rebuild an unchanged model).
Also printed: the process's import of graphopt + torch, the CPU seconds of the cold and warm compiles
(all the process's threads: less sensitive than wall time to other processes on a shared machine),
and the phases of the cold compile (``report.timings``). With ``--repeat N`` every figure is the
median of N fresh processes. The load average is printed: on a shared machine only the ratios
between rows taken together are honest.

Models: resnet18 and mobilenetv2 (224x224, as benchmarks/peers.py) or any `graphopt.zoo.ZOO` name.

Usage: python benchmarks/compile_time.py [--models resnet18,residual_cnn] [--target host] [--repeat N]

Compare two checkouts by running this script with each one's interpreter from its folder (the
child processes import graphopt from the working directory).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, os, sys, time
start = time.perf_counter()
import torch
import graphopt
from graphopt import zoo
imported = time.perf_counter() - start
name, target = sys.argv[1], sys.argv[2]
if name in ("resnet18", "mobilenetv2"):  # 224x224, as benchmarks/peers.py
    torch.manual_seed(0)
    model = {"resnet18": zoo.ResNet18, "mobilenetv2": zoo.MobileNetV2}[name]().eval()
    example = (torch.randn(1, 3, 224, 224),)
else:
    model, example = zoo.ZOO[name].factory()
def timed(**kw):
    t, cpu = time.perf_counter(), time.process_time()
    cm = graphopt.compile(model, example, target, progress=False, count_instructions=False, **kw)
    return time.perf_counter() - t, time.process_time() - cpu, cm.report
cold, cold_cpu, report = timed(cache=False)
warm, warm_cpu, _ = timed(cache=False)
timed(cache=True)  # stores the build
cached, _, hit = timed(cache=True)
assert hit.build_cache["hit"], hit.build_cache
print(json.dumps({"import": imported, "cold": cold, "warm": warm, "cached": cached, "cold_cpu": cold_cpu,
                  "warm_cpu": warm_cpu, "phases": report.timings}))
"""


def measure(name: str, target: str) -> dict:
    env = {**os.environ, "GRAPHOPT_BUILD_CACHE": tempfile.mkdtemp(prefix="graphopt-compile-time-")}
    out = subprocess.run([sys.executable, "-c", _CHILD, name, target], env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"{name} on {target} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    """Each figure's median over `runs` (the phases' too)."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "phases"}
    out["phases"] = {k: statistics.median(r["phases"].get(k, 0.0) for r in runs) for k in runs[0]["phases"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,residual_cnn")
    p.add_argument("--target", default="host")
    p.add_argument("--repeat", type=int, default=1, help="fresh processes per model; figures are medians")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} CPUs")
    print("\n| model | target | import s | cold s | cold CPU s | warm s | warm CPU s | cached s | cold phases |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = median_of([measure(name, args.target) for _ in range(args.repeat)])
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
        print(f"| {name} | {args.target} | {r['import']:.1f} | {r['cold']:.1f} | {r['cold_cpu']:.1f} | "
              f"{r['warm']:.1f} | {r['warm_cpu']:.1f} | {r['cached']:.2f} | {phases} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
