"""graphopt vs peers on the host, in one run, interleaved: batch-1 median latency at 224x224.

For a ResNet-18 and a MobileNetV2 (from benchmarks/host_latency.py, random weights): graphopt
untuned (default schedules), graphopt tuned (MetaSchedule, ``--trials`` per model into
``--db``, resumable), PyTorch eager, torch.compile, ONNX Runtime (``pip install -e .[bench]``);
every callable is timed alternately call by call, so machine load hits all alike. Prints
median/min ms and ratios to eager. The load average is printed: on a shared machine the figures
are noisy, and honest only relative to each other.

``--arm`` also prints aarch64 instruction counts (a PROXY under qemu-aarch64, not a speed) of
graphopt default vs tuned kernels for arm-a53 (cortex-a53) and arm-a55 (dotprod), tuned with
the emulated-icount runner (``--arm-trials``). Emulated ARM at 224x224 is slow: minutes per model.

Usage: python benchmarks/peers.py [--models resnet18,mobilenetv2] [--trials 64] [--runs 20]
                                  [--db tuning/] [--arm --arm-trials 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_latency import _interleaved_ms, _randomize_bn  # noqa: E402

import graphopt  # noqa: E402
from graphopt.zoo import MobileNetV2, ResNet18  # noqa: E402

MODELS = {"resnet18": ResNet18, "mobilenetv2": MobileNetV2}


def _onnx_session(model, x, threads: int):
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime not installed (pip install -e .[bench])"
    path = Path(tempfile.mkdtemp(prefix="graphopt-peers-")) / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # idle ORT workers spin by default, stealing the cores from whichever callable runs next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return (lambda: sess.run(None, feed)), None


def host(name: str, args) -> None:
    threads = graphopt.get_target("host").num_cores
    torch.set_num_threads(threads)
    model = _randomize_bn(MODELS[name]()).eval()
    x = torch.randn(1, 3, 224, 224)
    db = Path(args.db) / "host"
    summary = graphopt.tune(model, (x,), "host", trials=args.trials, database=db, progress=not args.quiet)
    untuned = graphopt.compile(model, (x,), "host", progress=False)
    tuned = graphopt.compile(model, (x,), "host", database=db, progress=False)
    with torch.no_grad():
        ref = model(x).numpy()
        compiled = torch.compile(model)
        compiled(x)
    for label, cm in (("untuned", untuned), ("tuned", tuned)):
        err = np.abs(cm(x).numpy() - ref).max() / np.abs(ref).max()
        print(f"{name}: graphopt {label} max rel error {err:.1e}")
    fns = {"graphopt untuned": lambda: untuned(x), f"graphopt tuned ({summary.trials_budget} trials)": lambda: tuned(x),
           "PyTorch eager": lambda: model(x), "torch.compile": lambda: compiled(x)}
    ort_fn, why = _onnx_session(model, x, threads)
    if ort_fn is not None:
        fns["ONNX Runtime"] = ort_fn
    with torch.no_grad():
        res = _interleaved_ms(fns, args.runs)
    eager = res["PyTorch eager"][0]
    print(f"\n{name} 224x224 batch 1, {threads} threads, load average {os.getloadavg()} "
          f"({len(summary.tasks)} kernels, {len(tuned.report.lowering.get('from_database', []))} from the database)")
    for label, (med, mn) in res.items():
        print(f"  {label:34s} median {med:8.2f} ms  min {mn:8.2f} ms  x eager {med / eager:5.2f}")
    if why:
        print(f"  ONNX Runtime: skipped, {why}")


def arm(name: str, args) -> None:
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.lowering.tuned import applying
    from graphopt.targets.tuning.database import open_database
    from graphopt.targets.tuning.icount import kernel_counts
    from graphopt.tuning import exported_for_tuning

    model = _randomize_bn(MODELS[name]()).eval()
    x = torch.randn(1, 3, 224, 224)
    for target in ("arm-a53", "arm-a55"):
        spec = graphopt.get_target(target)
        db = Path(args.db) / target
        graphopt.tune(model, (x,), spec, trials=args.arm_trials, database=db, runner="emulated-icount",
                      progress=not args.quiet)
        ep = exported_for_tuning(model, (x,), spec)
        default = sum(k["instructions"] for k in kernel_counts(lower(ep, spec).ir_module, spec).values())
        with applying(open_database(db, writable=False)):
            tuned = sum(k["instructions"] for k in kernel_counts(lower(ep, spec).ir_module, spec).values())
        print(f"{name} {target} (qemu -cpu {spec.qemu_cpu}): instructions per inference (PROXY, not time): "
              f"default {default:,}  tuned {tuned:,}  ratio {tuned / default:.2f} ({args.arm_trials} trials)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,mobilenetv2")
    p.add_argument("--trials", type=int, default=64, help="host tuning budget per model")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--db", default="tuning", help="parent folder of the per-target databases")
    p.add_argument("--arm", action="store_true", help="also count aarch64 instructions (proxy), default vs tuned")
    p.add_argument("--arm-trials", type=int, default=16)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} CPUs (shared machine: figures are noisy)")
    for name in args.models.split(","):
        host(name, args)
        if args.arm:
            arm(name, args)


if __name__ == "__main__":
    main()
