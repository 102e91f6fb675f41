"""graphopt vs its peers on the host, in one run: batch-1 latency, interleaved, with paired ratios.

Per model (random weights, randomized BatchNorm): ResNet-18 and MobileNetV2 at 224x224 on 2 threads,
a CIFAR ResNet-20 at 32x32 on 1 thread (`graphopt.zoo`). Measured callables:

- graphopt fp32 untuned (default schedules), graphopt fp32 tuned (MetaSchedule, ``--trials`` per model
  into ``--db``, resumable; ``--trials 0`` skips it), graphopt int8 (`graphopt.quantize` then
  `graphopt.compile`) and int8 tuned (the same budget: the int8 dot kernels' register tiles and loop
  orders measured, the rest by MetaSchedule; every kernel kept only where it beat its default);
- PyTorch eager, torch.compile with inductor freezing, PT2E int8 (torch.export, torchao's
  X86InductorQuantizer, prepare_pt2e/convert_pt2e, torch.compile with freezing);
- ONNX Runtime fp32 and int8 static QDQ (per-channel s8 weights; u8 and s8 activations;
  ``pip install -e .[bench]``).

All int8 paths calibrate on the same images (`benchmarks/int8.py`'s ``_images``). Every callable is
timed once per round, rounds interleaved in a shuffled order (`host_latency._interleaved_times`), so
load hits all alike (PyTorch's OpenMP pool is made passive, as ORT's is, so neither spins against
the next callable; TVM's keeps its default); the ratios are *paired*: the median over rounds of
(this row's time / the peer's time in the same round), against the best fp32 peer and the best int8
peer (lowest median; graphopt's rows are not peers), and each tuned row against its untuned one. A
peer that fails to build is reported in its row and the run goes on. The load average is printed: on
a shared machine absolute figures are noisy, same-run ratios less so.

``--arm`` also prints aarch64 instruction counts (a PROXY under qemu-aarch64, not a speed) of
graphopt default vs tuned kernels for arm-a53 (cortex-a53) and arm-a55 (dotprod), tuned with
the emulated-icount runner (``--arm-trials``). Emulated ARM at 224x224 is slow: minutes per model.

Each model runs in a process of its own, started with ``TVM_NUM_THREADS`` at the model's thread count:
TVM's pool cannot shrink once started (resized from 2 threads to 1 it still woke a worker for every
parallel region, ~6 µs each under load, which only graphopt's rows paid).

``--save DIR`` keeps graphopt's untuned fp32 and int8 artifacts; a later ``--baseline DIR`` times them
as extra rows beside the fresh builds (the weights are seeded): kernels before/after a change in
one interleaved run (the Python call path is the current one for both).

Usage: python benchmarks/peers.py [--models resnet18,mobilenetv2,resnet20] [--trials 64] [--runs 40]
                                  [--db tuning/] [--json peers.json] [--save DIR] [--baseline DIR]
                                  [--arm --arm-trials 16]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# PyTorch's idle OpenMP workers spin after each call (eager ran 896 ms median vs 134 ms min on ResNet-18
# at load 6) and take a core from whichever callable runs next; ORT's are told not to spin below. TVM's
# pool keeps its default (a passive one measured 2.8x its min): its worker spins briefly after a call.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._inductor.config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_latency import _interleaved_times, _randomize_bn  # noqa: E402
from int8 import _images, _ort_sessions  # noqa: E402

import graphopt  # noqa: E402
from graphopt.zoo import MobileNetV2, ResNet18, ResNet20  # noqa: E402


@dataclass(frozen=True)
class Bench:
    title: str
    build: Callable[[], torch.nn.Module]
    size: int
    threads: int


MODELS = {"resnet18": Bench("ResNet-18", ResNet18, 224, 2), "mobilenetv2": Bench("MobileNetV2", MobileNetV2, 224, 2),
          "resnet20": Bench("ResNet-20 (CIFAR)", ResNet20, 32, 1)}


@dataclass(frozen=True)
class Row:
    label: str
    precision: str  # "fp32" or "int8"
    peer: bool  # False for graphopt's own rows


def _set_tvm_threads(n: int) -> None:
    """Resize TVM's thread pool (process-wide; the first load reads TVM_NUM_THREADS)."""
    import tvm

    os.environ["TVM_NUM_THREADS"] = str(n)
    tvm.get_global_func("runtime.config_threadpool")(1, n)


def _pt2e_int8(model, x, calib):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    # strict: the non-strict export gives a ReLU module called twice (torchvision's BasicBlock) one source
    # partition with two outputs, which the quantizer refuses ("Input partition has more than one output node")
    prepared = prepare_pt2e(torch.export.export(model, (x,), strict=True).module(), quantizer)
    for (c,) in calib:
        prepared(c)
    return torch.compile(convert_pt2e(prepared))


def _builders(name: str, model, x, calib, threads: int, args, workdir: Path, notes: dict) -> list:
    """(Row, build) pairs; build() returns the callable of x (built and run once)."""
    db = Path(args.db) / "host"

    quantized: list = []

    def int8_model():  # quantized once: the untuned and tuned int8 rows compile the same module
        if not quantized:
            quantized.append(graphopt.quantize(model, (x,), calib))
        return quantized[0]

    def tuned(label, build_model):
        def build():
            m = build_model()
            summary = graphopt.tune(m, (x,), "host", trials=args.trials, database=db, progress=not args.quiet)
            cm = graphopt.compile(m, (x,), "host", database=db, progress=False)
            notes.setdefault("tuning", {})[label] = {
                "kernels": len(summary.tasks), "trials_budget": summary.trials_budget,
                "new_trials": summary.new_trials, "seconds": summary.seconds,
                "from_database": len(cm.report.lowering.get("from_database", []))}
            return cm
        return build

    sessions: dict = {}

    def ort(label):
        def build():  # one export and quantize_static for the three ORT rows
            if not sessions:
                sessions.update(_ort_sessions(model, x, calib, threads, workdir))
            return sessions[label]
        return build

    def saved(label, build):
        def wrapped():
            cm = build()
            if args.save:
                cm.save(Path(args.save) / name / label)
            return cm
        return wrapped

    rows = [(Row("graphopt fp32", "fp32", False),
             saved("fp32", lambda: graphopt.compile(model, (x,), "host", progress=False)))]
    for label in ("fp32", "int8") if args.baseline else ():
        if (Path(args.baseline) / name / label).is_dir():
            rows.append((Row(f"graphopt {label} (baseline)", label, False),
                         lambda label=label: graphopt.CompiledModel.load(Path(args.baseline) / name / label)))
    if args.trials:
        rows.append((Row(f"graphopt fp32 tuned ({args.trials} trials)", "fp32", False), tuned("fp32", lambda: model)))
    rows.append((Row("graphopt int8", "int8", False),
                 saved("int8", lambda: graphopt.compile(int8_model(), (x,), "host", progress=False))))
    if args.trials:
        rows.append((Row(f"graphopt int8 tuned ({args.trials} trials)", "int8", False), tuned("int8", int8_model)))
    rows += [
        (Row("PyTorch eager", "fp32", True), lambda: model),
        (Row("torch.compile (freezing)", "fp32", True), lambda: torch.compile(model)),
        (Row("PT2E int8 + inductor", "int8", True), lambda: _pt2e_int8(model, x, calib)),
        (Row("ORT fp32", "fp32", True), ort("ORT fp32")),
        (Row("ORT int8 QDQ (u8 act)", "int8", True), ort("ORT int8 (u8 act)")),
        (Row("ORT int8 QDQ (s8 act)", "int8", True), ort("ORT int8 (s8 act)")),
    ]
    return rows


def _paired(times: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def host(name: str, args) -> dict:
    bench = MODELS[name]
    torch.set_num_threads(bench.threads)
    _set_tvm_threads(bench.threads)
    torch.manual_seed(0)
    model = _randomize_bn(bench.build()).eval()
    shape = (1, 3, bench.size, bench.size)
    x = _images(shape, 1, seed=100)[0][0]
    calib = _images(shape, args.calib, seed=1)
    with torch.no_grad():
        ref = model(x).numpy()
    out: dict = {"title": bench.title, "size": bench.size, "threads": bench.threads, "runs": args.runs,
                 "calibration_inputs": args.calib, "rows": {}}
    fns, rows = {}, {}
    with tempfile.TemporaryDirectory(prefix="graphopt-peers-") as tmp:
        for row, build in _builders(name, model, x, calib, bench.threads, args, Path(tmp), out):
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    fn = build()
                    got = np.asarray(fn(x)).reshape(ref.shape)
            except Exception as exc:  # noqa: BLE001  a failing peer is a result, not the end of the run
                out["rows"][row.label] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                                          if str(exc).strip() else type(exc).__name__}
                if args.verbose:
                    traceback.print_exc()
                print(f"  {row.label}: failed: {out['rows'][row.label]['error']}", flush=True)
                continue
            out["rows"][row.label] = {"precision": row.precision, "peer": row.peer,
                                      "build_s": time.perf_counter() - start,
                                      "rel_err_vs_eager": float(np.abs(got - ref).max() / np.abs(ref).max())}
            fns[row.label], rows[row.label] = (lambda fn=fn: fn(x)), row
            print(f"  {row.label}: built in {out['rows'][row.label]['build_s']:.1f} s", flush=True)
        with torch.no_grad():
            times = _interleaved_times(fns, args.runs)
    out["load_average"] = os.getloadavg()
    best = {}
    for precision in ("fp32", "int8"):
        peers = [k for k, r in rows.items() if r.peer and r.precision == precision]
        best[precision] = min(peers, key=lambda k: statistics.median(times[k])) if peers else None
        out[f"best_{precision}_peer"] = best[precision]
    for label, t in times.items():
        out["rows"][label].update(
            median_ms=statistics.median(t) * 1e3, min_ms=min(t) * 1e3,
            **{f"vs_best_{p}_peer": _paired(times, label, best[p]) if best[p] else None for p in best})
        untuned = label.split(" tuned (")[0]
        if untuned != label and untuned in times:  # "graphopt int8 tuned (64 trials)" vs "graphopt int8"
            out["rows"][label]["vs_untuned"] = _paired(times, label, untuned)
    _print(out)
    return out


def _print(r: dict) -> None:
    tuning = "; ".join(f"{label} tuned: {t['kernels']} kernels, {t['from_database']} from the database"
                       for label, t in r.get("tuning", {}).items())
    print(f"\n{r['title']} {r['size']}x{r['size']} batch 1, {r['threads']} thread(s), {r['runs']} interleaved rounds, "
          f"load average {tuple(round(v, 2) for v in r['load_average'])}" + (f"; {tuning}" if tuning else ""))
    print(f"  ratios: median over rounds of this / peer in the same round; best fp32 peer: {r['best_fp32_peer']}, "
          f"best int8 peer: {r['best_int8_peer']}")
    print(f"  {'':34s} {'median ms':>10s} {'min ms':>9s} {'/ fp32 peer':>12s} {'/ int8 peer':>12s} {'rel err':>8s} "
          f"{'build s':>8s}")
    for label, row in r["rows"].items():
        if "error" in row:
            print(f"  {label:34s} failed: {row['error']}")
            continue
        ratios = " ".join(f"{row[k]:11.2f}x" if row[k] is not None else f"{'n/a':>12s}"
                          for k in ("vs_best_fp32_peer", "vs_best_int8_peer"))
        print(f"  {label:34s} {row['median_ms']:10.3f} {row['min_ms']:9.3f} {ratios} {row['rel_err_vs_eager']:8.1e} "
              f"{row['build_s']:8.1f}", flush=True)
    untuned = _vs_untuned(r)
    if untuned:
        print(f"  tuned / untuned, paired: {untuned}")


def _vs_untuned(r: dict) -> str:
    return ", ".join(f"{label} {row['vs_untuned']:.3f}x" for label, row in r["rows"].items() if "vs_untuned" in row)


def markdown(results: dict) -> str:
    """The run's tables in Markdown (for docs/benchmarks.md and the README)."""
    out = []
    for r in results["models"].values():
        load = ", ".join(f"{v:.1f}" for v in r["load_average"])
        out += [f"{r['title']}, {r['size']}×{r['size']}, batch 1, {r['threads']} thread(s), {r['runs']} interleaved "
                f"rounds, load average at the end {load}; paired ratios against the best fp32 peer "
                f"({r['best_fp32_peer']}) and the best int8 peer ({r['best_int8_peer']}):", "",
                "| | median ms | min ms | / best fp32 peer | / best int8 peer | max rel. error vs eager |",
                "|---|---|---|---|---|---|"]
        for label, row in r["rows"].items():
            if "error" in row:
                out.append(f"| {label} | failed: {row['error']} | | | | |")
                continue
            ratios = " | ".join(f"{row[k]:.2f}×" if row[k] is not None else "n/a"
                                for k in ("vs_best_fp32_peer", "vs_best_int8_peer"))
            out.append(f"| {label} | {row['median_ms']:.3f} | {row['min_ms']:.3f} | {ratios} | "
                       f"{row['rel_err_vs_eager']:.1e} |")
        out.append("")
        if _vs_untuned(r):
            out += [f"Tuned / untuned, median of the per-round ratios: {_vs_untuned(r)}.", ""]
    return "\n".join(out)


def arm(name: str, args) -> None:
    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.lowering.tuned import applying
    from graphopt.targets.tuning.database import open_database
    from graphopt.targets.tuning.icount import kernel_counts
    from graphopt.tuning import exported_for_tuning

    bench = MODELS[name]
    torch.manual_seed(0)
    model = _randomize_bn(bench.build()).eval()
    x = torch.randn(1, 3, bench.size, bench.size)
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


def _in_own_process(name: str, args) -> dict:
    """`host` (and `arm`) of one model in a child process whose TVM pool starts at the model's threads."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="graphopt-peers-") as tmp:
        out = Path(tmp) / f"{name}.json"
        argv, skip = [], False
        for a in sys.argv[1:]:  # this run's options but --models and --json
            if skip or a.split("=")[0] in ("--models", "--json"):
                skip = not skip and "=" not in a
                continue
            argv.append(a)
        argv += ["--models", name, "--json", str(out)]
        env = dict(os.environ, TVM_NUM_THREADS=str(MODELS[name].threads))
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env, check=True)
        return json.loads(out.read_text())["models"][name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--trials", type=int, default=64, help="host tuning budget per model (0: no tuned row)")
    p.add_argument("--runs", type=int, default=40, help="interleaved rounds")
    p.add_argument("--calib", type=int, default=16, help="calibration inputs (batch 1 each), shared by all int8 paths")
    p.add_argument("--db", default="tuning", help="parent folder of the per-target databases")
    p.add_argument("--json", default="peers.json", help="where to write the results")
    p.add_argument("--save", help="save graphopt's untuned fp32 and int8 artifacts under SAVE/<model>/")
    p.add_argument("--baseline", help="also time the artifacts an earlier --save wrote there (same weights): "
                                      "before/after a change in one interleaved run")
    p.add_argument("--arm", action="store_true", help="also count aarch64 instructions (proxy), default vs tuned")
    p.add_argument("--arm-trials", type=int, default=16)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failing peer")
    args = p.parse_args()
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    torch._inductor.config.freezing = True  # constant-fold weights into the compiled graph (both torch.compile rows)
    results = {"command": " ".join(sys.argv), "load_average_start": os.getloadavg(), "cpus": os.cpu_count(),
               "models": {}}
    print(f"load average at start: {results['load_average_start']} on {os.cpu_count()} CPUs "
          "(shared machine: absolute figures are noisy)", flush=True)
    names = args.models.split(",")
    if len(names) == 1:
        name = names[0]
        print(f"\n{MODELS[name].title}: building", flush=True)
        results["models"][name] = host(name, args)
        if args.arm:
            arm(name, args)
    else:
        for name in names:
            results["models"][name] = _in_own_process(name, args)
    path = Path(args.json)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    print(f"\nresults written to {path}\n\n{markdown(results)}")


if __name__ == "__main__":
    main()
