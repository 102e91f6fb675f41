"""int8 vs fp32, in one run: does graphopt's int8 pay off on the host, on aarch64 and on a Cortex-M4?

Host: a ResNet-18 (random weights, randomized BatchNorm, ``--size`` x ``--size``, batch 1, the host
spec's core count as threads) as graphopt fp32, graphopt int8 (`graphopt.quantize`: PTQ, per-channel
int8, calibrated on smooth random images), ONNX Runtime fp32 and ONNX Runtime int8 (static QDQ,
per-channel, calibrated on the same images; u8 and s8 activations) and PyTorch eager fp32, all timed
alternately call by call. Prints median/min ms, the accuracy of graphopt int8 (vs its PyTorch QDQ
module and top-1 vs fp32) and PASS/FAIL for: graphopt int8 >= 2.5x faster than graphopt fp32, and
faster than the fastest ONNX Runtime int8. The load average is printed: on a shared machine the
figures are honest only relative to each other.

aarch64 (``--arm-size``, default 64, emulated): instructions per inference under qemu-aarch64 (a
PROXY, not a speed) of the same ResNet-18 fp32 vs int8 on arm-a53 (NEON), arm-a55 (dotprod) and
arm-a76 (i8mm); requirement int8/fp32 <= 0.35. On i8mm targets also int8 with the target's i8mm
feature removed (its ``sdot`` kernel path); requirement int8 (smmla) / int8 (sdot) <= 0.85. The zoo
models of ``--arm-models`` (default mobilenet_blocks: MobileNetV2-style inverted residuals, depthwise
3x3, a grouped conv; depthwise_concat: torchvision-style inverted residuals, a concat of a 1x1 and a
depthwise-separable branch, a linear head) the same way, on ``--arm-zoo-targets`` (default also the
runtime-free C library builds arm-a53-c and arm-a55-c, figures only); issue 16 requires mobilenet_blocks
int8/fp32 <= 0.45 on arm-a55 and <= 0.75 on arm-a53, depthwise_concat <= 0.35 on arm-a55.

Cortex-M4 (zoo models, bare metal under qemu-system-arm): per model fp32, int8 (default,
optimize_for="balanced") and int8 with optimize_for="size": instructions per inference, flash (kernels +
weights + glue + the libc code they pull in, from the linker map) and RAM (the arena: activations and
kernel scratch, against its peak-live lower bound); requirements int8/fp32 <= 0.5 (instructions) and
<= 0.3 (arena). Where Arm CMSIS-NN was measured on the same layers (issue 16: TFLite Micro's kernels,
gcc -O2, called directly, outputs bit-identical), its figures and graphopt's ratios to them are
printed; residual_cnn's size build must reach flash <= 1.05x, RAM <= 1.0x and instructions <= 0.8x
CMSIS-NN's (0.8x is 1.25x graphopt's default build when CMSIS-NN was measured).

Real code (``--real-code``): torchvision's ResNet-18 and MobileNetV2 written as torchvision writes
them (`graphopt/torchvision_style.py`: ``ReLU(inplace=True)``, ``out += identity``, in-place ReLU6,
dropout), random weights: fp32 ops left in the int8 graph and its MACs by precision, host latency of
graphopt fp32 / int8 vs ONNX Runtime int8 and PyTorch eager (``--size``), and aarch64 instructions
int8 / fp32 (``--arm-size``, ``--real-arm-targets``). Figures only, no requirement lines.

Each section reports its own failure (e.g. a missing tool) and the others still run.

Usage: python benchmarks/int8.py [--size 224] [--runs 30] [--arm-size 64] [--no-arm] [--arm-targets arm-a76] [--no-m4]
                                 [--m4-models plain_cnn,residual_cnn,mobilenet_blocks] [--real-code] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_latency import _interleaved_ms, _randomize_bn

import graphopt
from graphopt import torchvision_style
from graphopt.targets import Feature
from graphopt.zoo import ZOO, ResNet18

ARM_TARGETS = ("arm-a53", "arm-a55", "arm-a76")
ARM_ZOO_TARGETS = (*ARM_TARGETS, "arm-a53-c", "arm-a55-c")  # the C library builds: no VM between the kernels
# issue 16: int8 / fp32 instructions of the zoo models on aarch64
ARM_ZOO_RATIO = {"mobilenet_blocks": {"arm-a53": 0.75, "arm-a55": 0.45}, "depthwise_concat": {"arm-a55": 0.35}}
HOST_SPEEDUP, ARM_RATIO, M4_INSTR_RATIO, M4_ARENA_RATIO = 2.5, 0.35, 0.5, 0.3
I8MM_VS_SDOT = 0.85  # int8 instructions with smmla / with the same target's sdot kernels
# CMSIS-NN on cortex-m4 (issue 16; flash = kernels + weights + glue, RAM = arena + scratch); instructions
# from the measured ratios to graphopt's default build of that day (plain_cnn 1,798,783 / 0.51,
# residual_cnn 19,049,525 / 0.64)
CMSIS_NN = {"plain_cnn": {"flash_bytes": 120_916, "ram_bytes": 16_256, "instructions": 1_798_783 / 0.51},
            "residual_cnn": {"flash_bytes": 97_744, "ram_bytes": 51_456, "instructions": 19_049_525 / 0.64}}
SIZE_VS_CMSIS = {"flash_bytes": 1.05, "ram_bytes": 1.0, "instructions": 0.8}  # residual_cnn, optimize_for="size"


def _zoo_calibration(inputs: tuple, n: int) -> list[tuple[torch.Tensor]]:
    """``n`` calibration inputs like a zoo model's example `inputs` (one tensor): normal noise for float
    inputs, token ids below the example's largest for integer ones (the tiny transformer's)."""
    (x,) = inputs
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    if x.is_floating_point():
        return [(torch.randn(x.shape, generator=g),) for g in gens]
    return [(torch.randint(0, int(x.max()) + 1, x.shape, generator=g, dtype=x.dtype),) for g in gens]


def _images(shape: tuple, n: int, seed: int) -> list[tuple[torch.Tensor]]:
    """``n`` batch-1 inputs of ``shape``: low-frequency noise plus a little pixel noise, standardized
    (closer to natural images' activation ranges than white noise)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape[1:]
    out = []
    for _ in range(n):
        low = torch.randn(1, c, max(1, h // 8), max(1, w // 8), generator=g)
        x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        x = x + 0.1 * torch.randn(1, c, h, w, generator=g)
        out.append(((x - x.mean()) / x.std(),))
    return out


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(ResNet18()).eval()


def _check(results: dict, label: str, value: float | None, op: str, limit: float) -> None:
    ok = value is not None and {"<": value < limit, "<=": value <= limit, ">=": value >= limit}[op]
    shown = "n/a" if value is None else f"{value:.3f}"
    print(f"  {'PASS' if ok else 'FAIL'}  {label}: {shown} (required {op} {limit})", flush=True)
    results.setdefault("requirements", []).append({"label": label, "value": value, "required": f"{op} {limit}",
                                                   "pass": ok})


# --------------------------------------------------------------------------- host

def _ort_run(sess, name: str, x: torch.Tensor) -> np.ndarray:
    return sess.run(None, {name: x.numpy()})[0]


def _ort_sessions(model, x, calib, threads: int, workdir: Path) -> dict:
    """ONNX Runtime callables: fp32 and static QDQ int8 (per-channel s8 weights; u8 and s8 activations)."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre = workdir / "fp32.onnx", workdir / "fp32.pre.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(fp32), dynamo=False)
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self, name):
            self._it = iter([{name: b[0].numpy()} for b in calib])

        def get_next(self):
            return next(self._it, None)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # idle ORT workers spin by default, stealing the cores from whichever callable runs next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    paths = {"ORT fp32": fp32}
    name = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    for label, act in (("ORT int8 (u8 act)", QuantType.QUInt8), ("ORT int8 (s8 act)", QuantType.QInt8)):
        paths[label] = workdir / f"{act.name}.onnx"
        quantize_static(str(pre), str(paths[label]), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=act, weight_type=QuantType.QInt8)
    sessions = {}
    for label, path in paths.items():
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        sessions[label] = functools.partial(_ort_run, sess, sess.get_inputs()[0].name)
    return sessions


def host(args, results: dict) -> None:
    threads = graphopt.get_target("host").num_cores
    torch.set_num_threads(threads)
    model = _resnet18()
    shape = (1, 3, args.size, args.size)
    x = _images(shape, 1, seed=100)[0][0]
    calib, evals = _images(shape, args.calib, seed=1), _images(shape, args.eval, seed=2)
    r = results["host"] = {"size": args.size, "threads": threads, "calibration_inputs": args.calib}

    start = time.perf_counter()
    q = graphopt.quantize(model, (x,), calib)
    r["quantize_s"] = time.perf_counter() - start
    compiled = {}
    for label, m in (("graphopt fp32", model), ("graphopt int8", q)):
        start = time.perf_counter()
        compiled[label] = graphopt.compile(m, (x,), "host", progress=False)
        r[f"compile_s {label}"] = time.perf_counter() - start
    fns = {**compiled, "PyTorch eager fp32": model}
    try:
        with tempfile.TemporaryDirectory(prefix="graphopt-int8-") as tmp:
            fns.update(_ort_sessions(model, x, calib, threads, Path(tmp)))
    except Exception as exc:  # noqa: BLE001  ORT missing or failing must not hide graphopt's figures
        r["onnxruntime_error"] = f"{type(exc).__name__}: {exc}"
        print(f"  ONNX Runtime skipped: {r['onnxruntime_error']} (pip install -e .[bench])", flush=True)

    with torch.no_grad():
        outs = {label: [np.asarray(fn(e[0])).reshape(-1) for e in evals] for label, fn in fns.items()}
        qdq = [q(e[0]).numpy().reshape(-1) for e in evals]
    scale = max(float(np.abs(o).max()) for o in qdq)
    r["int8_vs_qdq_max_abs"] = max(float(np.abs(a - b).max()) for a, b in zip(outs["graphopt int8"], qdq, strict=True))
    r["int8_vs_qdq_rel"] = r["int8_vs_qdq_max_abs"] / scale
    top1 = [int(o.argmax()) for o in outs["graphopt fp32"]]
    r["top1_agreement_vs_graphopt_fp32"] = {
        label: sum(int(o.argmax()) == t for o, t in zip(outs[label], top1, strict=True)) / len(evals)
        for label in outs if "int8" in label}

    with torch.no_grad():
        res = _interleaved_ms({label: functools.partial(fn, x) for label, fn in fns.items()}, args.runs)
    r["ms"] = {label: {"median": med, "min": mn} for label, (med, mn) in res.items()}
    r["load_average"] = os.getloadavg()
    print(f"\nHost: ResNet-18 {args.size}x{args.size} batch 1, {threads} threads, {args.runs} interleaved runs, "
          f"load average {r['load_average'][0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    g32 = res["graphopt fp32"][0]
    for label, (med, mn) in res.items():
        print(f"  {label:22s} median {med:8.2f} ms  min {mn:8.2f} ms  graphopt fp32 / this {g32 / med:5.2f}x")
    print(f"  graphopt int8 vs its PyTorch QDQ module: max abs diff {r['int8_vs_qdq_max_abs']:.3g} "
          f"({r['int8_vs_qdq_rel']:.2%} of output scale) over {args.eval} inputs")
    print("  top-1 agreement with graphopt fp32: " + ", ".join(
        f"{k} {v:.0%}" for k, v in r["top1_agreement_vs_graphopt_fp32"].items()), flush=True)
    r["speedup_int8_vs_fp32"] = g32 / res["graphopt int8"][0]
    _check(results, "host: graphopt int8 speed-up vs graphopt fp32 (median)", r["speedup_int8_vs_fp32"],
           ">=", HOST_SPEEDUP)
    ort_int8 = [res[k] for k in res if k.startswith("ORT int8")]
    r["int8_vs_best_ort_int8"] = res["graphopt int8"][0] / min(t[0] for t in ort_int8) if ort_int8 else None
    r["speedup_int8_vs_fp32_min"] = res["graphopt fp32"][1] / res["graphopt int8"][1]
    r["int8_vs_best_ort_int8_min"] = res["graphopt int8"][1] / min(t[1] for t in ort_int8) if ort_int8 else None
    print(f"  (on min times: int8 speed-up vs fp32 {r['speedup_int8_vs_fp32_min']:.2f}x, "
          f"graphopt int8 / fastest ORT int8 {r['int8_vs_best_ort_int8_min'] or float('nan'):.2f})", flush=True)
    _check(results, "host: graphopt int8 / fastest ORT int8 (median)", r["int8_vs_best_ort_int8"], "<", 1.0)


# --------------------------------------------------------------------------- real code

REAL_CODE = {"ResNet-18": lambda: torchvision_style.resnet18(), "MobileNetV2": lambda: torchvision_style.MobileNetV2()}


def real_code(args, results: dict) -> None:
    threads = graphopt.get_target("host").num_cores
    torch.set_num_threads(threads)
    r = results["real_code"] = {"size": args.size, "arm_size": args.arm_size, "threads": threads}
    for name, build in REAL_CODE.items():
        torch.manual_seed(0)
        model = _randomize_bn(build()).eval()
        row = r[name] = {}
        print(f"\nreal code: torchvision-style {name}", flush=True)
        shape = (1, 3, args.size, args.size)
        x, calib = _images(shape, 1, seed=100)[0][0], _images(shape, args.calib, seed=1)
        q = graphopt.quantize(model, (x,), calib)
        fns = {"graphopt fp32": graphopt.compile(model, (x,), "host", progress=False),
               "graphopt int8": graphopt.compile(q, (x,), "host", progress=False), "PyTorch eager fp32": model}
        rep = fns["graphopt int8"].report
        row.update(float_ops_in_int8=rep.quantization.get("float_ops"), macs_int8=rep.macs_after,
                   macs_fp32=fns["graphopt fp32"].report.macs_after, macs_int8_by_precision=rep.macs_by_precision)
        print(f"  int8 graph: {row['float_ops_in_int8']} fp32 ops left between quantize and dequantize; MACs "
              f"{row['macs_int8']:,} ({row['macs_int8_by_precision']}) vs fp32 {row['macs_fp32']:,}", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="graphopt-int8-") as tmp:
                fns.update({k: v for k, v in _ort_sessions(model, x, calib, threads, Path(tmp)).items()
                            if k.startswith("ORT int8")})
        except Exception as exc:  # noqa: BLE001
            row["onnxruntime_error"] = f"{type(exc).__name__}: {exc}"
            print(f"  ONNX Runtime skipped: {row['onnxruntime_error']} (pip install -e .[bench])", flush=True)
        with torch.no_grad():
            res = _interleaved_ms({label: functools.partial(fn, x) for label, fn in fns.items()}, args.runs)
        row["ms"] = {label: {"median": med, "min": mn} for label, (med, mn) in res.items()}
        row["load_average"] = os.getloadavg()
        print(f"  host {args.size}x{args.size}, {threads} threads, {args.runs} interleaved runs, load "
              f"{row['load_average'][0]:.2f}:", flush=True)
        for label, (med, mn) in res.items():
            print(f"    {label:22s} median {med:8.2f} ms  min {mn:8.2f} ms", flush=True)
        ashape = (1, 3, args.arm_size, args.arm_size)
        ax = _images(ashape, 1, seed=100)[0][0]
        aq = graphopt.quantize(model, (ax,), _images(ashape, args.calib, seed=1))
        for target in args.real_arm_targets.split(","):
            try:
                fp32, _ = _instructions(model, (ax,), target)
                int8, _ = _instructions(aq, (ax,), target)
            except Exception as exc:  # noqa: BLE001
                row[target] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  {target}: FAILED {row[target]['error']}", flush=True)
                continue
            row[target] = {"fp32": fp32, "int8": int8, "ratio": int8 / fp32 if int8 and fp32 else None}
            print(f"  {target} {args.arm_size}x{args.arm_size}: instructions fp32 {fp32 or 0:,}  int8 {int8 or 0:,}  "
                  f"int8 / fp32 {row[target]['ratio'] or float('nan'):.3f}", flush=True)


# --------------------------------------------------------------------------- emulated targets

def _instructions(model, inputs: tuple, target: str | graphopt.TargetSpec, **options) -> tuple[int | None, dict]:
    cm = graphopt.compile(model, inputs, target, progress=False, count_instructions=True, **options)
    rep = cm.report
    if rep.instructions_per_inference is None:
        print(f"  {target}: no instruction count ({rep.instructions_note})", flush=True)
    return rep.instructions_per_inference, rep.lowering


def arm(args, results: dict) -> None:
    model = _resnet18()
    shape = (1, 3, args.arm_size, args.arm_size)
    x = _images(shape, 1, seed=100)[0][0]
    q = graphopt.quantize(model, (x,), _images(shape, args.calib, seed=1))
    r = results["arm"] = {"size": args.arm_size}
    print(f"\naarch64: ResNet-18 {args.arm_size}x{args.arm_size}, instructions per inference under qemu-aarch64 "
          "(PROXY, not time)", flush=True)
    for target in args.arm_targets.split(","):
        try:
            spec = graphopt.get_target(target)
            fp32, _ = _instructions(model, (x,), target)
            int8, _ = _instructions(q, (x,), target)
        except Exception as exc:  # noqa: BLE001  one target's failure must not hide the others
            r[target] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {target}: FAILED {r[target]['error']}", flush=True)
            _check(results, f"{target}: instructions int8 / fp32", None, "<=", ARM_RATIO)
            continue
        ratio = int8 / fp32 if int8 and fp32 else None
        r[target] = {"qemu_cpu": spec.qemu_cpu, "fp32": fp32, "int8": int8, "ratio": ratio}
        print(f"  {target} (-cpu {spec.qemu_cpu}): fp32 {fp32 or 0:,}  int8 {int8 or 0:,}", flush=True)
        _check(results, f"{target}: instructions int8 / fp32", ratio, "<=", ARM_RATIO)
        if spec.has(Feature.I8MM):
            _i8mm_vs_sdot(results, r[target], spec, q, x, int8)


def _i8mm_vs_sdot(results: dict, row: dict, spec, q, x, int8: int | None) -> None:
    """int8 on `spec` against the same target without i8mm (same CPU and LLVM target: the sdot kernels)."""
    sdot_spec = dataclasses.replace(spec, name=f"{spec.name}-sdot", features=spec.features - {Feature.I8MM})
    try:
        sdot, _ = _instructions(q, (x,), sdot_spec)
    except Exception as exc:  # noqa: BLE001
        row["int8_sdot_error"] = f"{type(exc).__name__}: {exc}"
        print(f"  {spec.name} without i8mm: FAILED {row['int8_sdot_error']}", flush=True)
        sdot = None
    row["int8_sdot"] = sdot
    row["i8mm_vs_sdot"] = int8 / sdot if int8 and sdot else None
    print(f"  {spec.name} int8 without i8mm (sdot kernels): {sdot or 0:,}", flush=True)
    _check(results, f"{spec.name}: instructions int8 smmla / sdot", row["i8mm_vs_sdot"], "<=", I8MM_VS_SDOT)


def arm_zoo(args, results: dict) -> None:
    r = results["arm_zoo"] = {}
    print("\naarch64 zoo models: instructions per inference under qemu-aarch64 (PROXY, not time)", flush=True)
    for name in filter(None, args.arm_models.split(",")):
        model, inputs = ZOO[name].factory()
        shape = tuple(inputs[0].shape)
        q = graphopt.quantize(model, inputs, _zoo_calibration(inputs, args.calib))
        print(f"  zoo {name} {shape}:", flush=True)
        for target in args.arm_zoo_targets.split(","):
            limit = ARM_ZOO_RATIO.get(name, {}).get(target)
            try:
                fp32, _ = _instructions(model, inputs, target)
                int8, _ = _instructions(q, inputs, target)
            except Exception as exc:  # noqa: BLE001
                r[f"{name} {target}"] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"    {target}: FAILED {r[f'{name} {target}']['error']}", flush=True)
                continue
            ratio = int8 / fp32 if int8 and fp32 else None
            r[f"{name} {target}"] = {"fp32": fp32, "int8": int8, "ratio": ratio}
            print(f"    {target}: fp32 {fp32 or 0:,}  int8 {int8 or 0:,}  int8 / fp32 {ratio or float('nan'):.3f}",
                  flush=True)
            if limit is not None:
                _check(results, f"{target} {name}: instructions int8 / fp32", ratio, "<=", limit)


def m4(args, results: dict) -> None:
    r = results["m4"] = {}
    print("\nCortex-M4 (qemu-system-arm mps2-an386): instructions per inference, flash, RAM arena (activations "
          "+ kernel scratch) and its peak-live lower bound", flush=True)
    for name in args.m4_models.split(","):
        try:
            model, inputs = ZOO[name].factory()
            shape = tuple(inputs[0].shape)
            q = graphopt.quantize(model, inputs, _zoo_calibration(inputs, args.calib))
            figures = {}
            for label, m, options in (("fp32", model, {}), ("int8", q, {}), ("int8 size", q, {"optimize_for": "size"})):
                n, low = _instructions(m, inputs, "cortex-m4", **options)
                figures[label] = {"instructions": n, "arena_bytes": low["ram"]["arena"],
                                  "arena_lower_bound": low["arena"]["lower_bound"], "ram_bytes": low["ram_bytes"],
                                  "flash_bytes": low["flash_bytes"], "flash": low["flash"],
                                  "kernels": low["kernels"], "kernel_calls": low["kernel_calls"],
                                  "weight_storage": {k: low["weight_storage"][k]
                                                     for k in ("int16_layers", "int8_layers")}}
        except Exception as exc:  # noqa: BLE001
            r[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {name}: FAILED {r[name]['error']}", flush=True)
            _check(results, f"cortex-m4 {name}: instructions int8 / fp32", None, "<=", M4_INSTR_RATIO)
            _check(results, f"cortex-m4 {name}: RAM arena int8 / fp32", None, "<=", M4_ARENA_RATIO)
            continue
        f32, i8, small = figures["fp32"], figures["int8"], figures["int8 size"]
        figures["instructions_ratio"] = (i8["instructions"] / f32["instructions"]
                                         if i8["instructions"] and f32["instructions"] else None)
        figures["arena_ratio"] = i8["arena_bytes"] / f32["arena_bytes"]
        r[name] = figures
        peer = CMSIS_NN.get(name)
        rows = [(label, figures[label]) for label in ("fp32", "int8", "int8 size")]
        if peer:
            rows.append(("CMSIS-NN int8", {"instructions": round(peer["instructions"]),
                                           "flash_bytes": peer["flash_bytes"], "arena_bytes": peer["ram_bytes"],
                                           "arena_lower_bound": None}))
        print(f"  {name} {shape}")
        print(f"    {'build':14s} {'instructions':>12s} {'flash B':>9s} {'RAM arena B':>12s} {'lower bound':>12s}"
              + ("   vs CMSIS-NN: instr  flash  RAM" if peer else ""))
        for label, f in rows:
            vs = ""
            if peer and label.startswith("int8"):
                vs = "   " + "  ".join(f"{(f[k] or 0) / peer[k]:.2f}" for k in ("instructions", "flash_bytes")) \
                    + f"  {f['arena_bytes'] / peer['ram_bytes']:.2f}"
            bound = "" if f["arena_lower_bound"] is None else f"{f['arena_lower_bound']:,}"
            print(f"    {label:14s} {f['instructions'] or 0:>12,} {f['flash_bytes']:>9,} {f['arena_bytes']:>12,} "
                  f"{bound:>12s}{vs}", flush=True)
        _check(results, f"cortex-m4 {name}: instructions int8 / fp32", figures["instructions_ratio"], "<=",
               M4_INSTR_RATIO)
        _check(results, f"cortex-m4 {name}: RAM arena int8 / fp32", figures["arena_ratio"], "<=", M4_ARENA_RATIO)
        for label in ("int8", "int8 size"):
            _check(results, f"cortex-m4 {name} {label}: arena - peak-live lower bound (bytes)",
                   figures[label]["arena_bytes"] - figures[label]["arena_lower_bound"], "<=", 0)
        if name == "residual_cnn":
            for key, limit in SIZE_VS_CMSIS.items():
                mine = small["arena_bytes"] if key == "ram_bytes" else small[key]
                _check(results, f"cortex-m4 residual_cnn size: {key} / CMSIS-NN's",
                       mine / peer[key] if mine else None, "<=", limit)
            if small["instructions"] and i8["instructions"]:
                print(f"    (instructions size / default build: {small['instructions'] / i8['instructions']:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=224, help="host input height and width")
    p.add_argument("--runs", type=int, default=30, help="interleaved timed runs per callable")
    p.add_argument("--calib", type=int, default=16, help="calibration inputs (batch 1 each)")
    p.add_argument("--eval", type=int, default=8, help="inputs for the accuracy figures")
    p.add_argument("--arm-size", type=int, default=64, help="aarch64 input height and width (emulated: keep small)")
    p.add_argument("--arm", action=argparse.BooleanOptionalAction, default=True, help="aarch64 instruction counts")
    p.add_argument("--arm-models", default="mobilenet_blocks,depthwise_concat",
                   help=f"zoo models measured on aarch64, fp32 vs int8 (from {', '.join(ZOO)}; empty: none)")
    p.add_argument("--arm-targets", default=",".join(ARM_TARGETS), help="aarch64 targets of the ResNet-18 counts")
    p.add_argument("--arm-zoo-targets", default=",".join(ARM_ZOO_TARGETS), help="aarch64 targets of --arm-models")
    p.add_argument("--m4", action=argparse.BooleanOptionalAction, default=True,
                   help="Cortex-M4 instructions, flash and RAM (fp32, int8, int8 size) vs CMSIS-NN")
    p.add_argument("--m4-models", default="plain_cnn,residual_cnn,mobilenet_blocks",
                   help=f"from graphopt.zoo: {', '.join(ZOO)}")
    p.add_argument("--host", action=argparse.BooleanOptionalAction, default=True, help="host latency")
    p.add_argument("--real-code", action=argparse.BooleanOptionalAction, default=False,
                   help="torchvision-style ResNet-18 and MobileNetV2: host latency and aarch64 instructions")
    p.add_argument("--real-arm-targets", default=",".join(ARM_TARGETS), help="aarch64 targets of --real-code")
    p.add_argument("--json", type=Path, help="write all figures here")
    args = p.parse_args()
    results: dict = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"load average at start: {results['load_average_start'][0]:.2f} on {os.cpu_count()} CPUs "
          "(shared machine: latencies are noisy)", flush=True)
    for section, enabled in ((host, args.host), (arm, args.arm), (arm_zoo, bool(args.arm_models)), (m4, args.m4),
                             (real_code, args.real_code)):
        if not enabled:
            continue
        start = time.perf_counter()
        try:
            section(args, results)
        except Exception as exc:  # noqa: BLE001  each section reports its own failure
            results.setdefault(section.__name__, {})["error"] = f"{type(exc).__name__}: {exc}"
            print(f"\n{section.__name__}: FAILED\n{traceback.format_exc()}", flush=True)
        results.setdefault(section.__name__, {})["section_s"] = time.perf_counter() - start
    results["load_average_end"] = os.getloadavg()
    reqs = results.get("requirements", [])
    print(f"\nload average at end: {results['load_average_end'][0]:.2f}; "
          f"{sum(r['pass'] for r in reqs)}/{len(reqs)} requirements pass", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
