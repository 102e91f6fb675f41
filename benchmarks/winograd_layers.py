"""Winograd F(m, 3) against the direct conv, per layer: each variant's kernels timed in one process,
interleaved round by round (TVM's time_evaluator per scheduled PrimFunc, summed per variant).

Each layer is a Relax NHWC conv2d 3×3/1 (padding 1) + bias + ReLU lowered through graphopt's legalize,
fuse and schedule phases for the host, with Winograd off and with each ``--tiles`` m — on every layer,
including those `winograd.choose_tile` declines or gives another m (the measurements its rule is drawn from). Set
``TVM_NUM_THREADS`` before the run: resizing TVM's pool later leaves each parallel region several µs
to start. Usage:

    TVM_NUM_THREADS=1 python benchmarks/winograd_layers.py --layers 32x16,16x32,8x64
    TVM_NUM_THREADS=2 python benchmarks/winograd_layers.py --layers 56x64,28x128,14x256,7x512 --tiles 2,4
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import numpy as np
import tvm
from tvm import relax

from graphopt.targets.host import detect_host
from graphopt.targets.lowering import winograd
from graphopt.targets.lowering.phases import run_phases


def conv_module(channels: int, size: int, rng) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, size, size, channels), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const((rng.standard_normal((3, 3, channels, channels)) / np.sqrt(9 * channels)).astype("float32"))
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=1, data_layout="NHWC", kernel_layout="HWIO",
                                           out_dtype="float32"))
            y = bb.emit(relax.op.add(y, relax.const(rng.standard_normal((1, 1, 1, channels)).astype("float32"))))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    return bb.get()


def kernels(mod: tvm.IRModule, spec, rng, number: int) -> dict:
    """name -> (timer, arguments) for each PrimFunc `mod` is scheduled into for `spec`."""
    state: dict = {}
    scheduled = run_phases(mod, spec, state, {}, until="schedule", skip=lambda name, ir: name not in
                           ("legalize", "fuse", "schedule"))
    dev = tvm.cpu()
    out = {}
    for gv, func in scheduled.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=spec.tvm())
            args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.ty.shape]).astype(str(p.ty.dtype)), dev)
                    for p in func.params]
            out[gv.name_hint] = (lib.jit().time_evaluator("main", dev, number=number, repeat=1), args)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="32x16,16x32,8x64", help="SIZExCHANNELS, comma-separated")
    p.add_argument("--tiles", default="4", help="Winograd output tile sizes m to measure")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--number", type=int, default=20, help="calls per timing")
    args = p.parse_args()
    host = detect_host()
    rng = np.random.default_rng(0)
    print(f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', '(default)')}, load average {os.getloadavg()}")
    for layer in args.layers.split(","):
        size, channels = (int(v) for v in layer.split("x"))
        mod = conv_module(channels, size, rng)
        variants = {"direct": kernels(mod, dataclasses.replace(host, winograd=False), rng, args.number)}
        for m in (int(t) for t in args.tiles.split(",")):
            winograd.choose_tile = lambda *_, m=m: m  # every layer takes F(m, 3), for the measurement
            variants[f"F({m},3)"] = kernels(mod, host, rng, args.number)
        totals: dict[str, list[float]] = {k: [] for k in variants}
        parts: dict[str, dict[str, list[float]]] = {k: {n: [] for n in v} for k, v in variants.items()}
        for _ in range(args.rounds):
            for k, ks in variants.items():
                times = {n: timer(*a).mean * 1e6 for n, (timer, a) in ks.items()}
                totals[k].append(sum(times.values()))
                for n, t in times.items():
                    parts[k][n].append(t)
        line = f"{size}x{size}x{channels}: direct {statistics.median(totals['direct']):.1f} us"
        for k in list(variants)[1:]:
            ratio = statistics.median(a / b for a, b in zip(totals[k], totals["direct"], strict=True))
            stages = ", ".join(f"{n}: {statistics.median(v):.1f}" for n, v in parts[k].items())
            line += f"; {k} {statistics.median(totals[k]):.1f} us ({stages}), paired ratio {ratio:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
