"""One binary (a1w1) conv layer 256→256, 3×3, pad 1, on 1×256×28×28 vs the same fp32 nn.Conv2d.

Prints host latency (median of interleaved runs) and aarch64 instructions per inference under QEMU
(a proxy, not a speed), and the binary/fp32 ratios. Run: ``.venv/bin/python benchmarks/binary_layer.py``
(``--no-arm`` skips the emulated target).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import graphopt


def binary_layer(conv: nn.Conv2d, x: torch.Tensor):
    """`conv` binarized (sign weights and activations), one SGD step, converted to QDQ form."""
    bm = graphopt.binarize(conv, (x,), keep_first_last=False, binary_activations=True, calibration=[x])
    opt = torch.optim.SGD(bm.parameters(), lr=1e-3)
    bm(x).square().mean().backward()
    opt.step()
    return graphopt.convert(bm)


def median_ms(models: dict, x: torch.Tensor, runs: int) -> dict:
    for m in models.values():
        m(x)
    times: dict = {k: [] for k in models}
    for _ in range(runs):  # interleaved, so drift hits both alike
        for k, m in models.items():
            start = time.perf_counter()
            m(x)
            times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-arm", action="store_true")
    ap.add_argument("--arm-target", default="arm-a53")
    a = ap.parse_args()
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, 3, padding=1).eval()
    x = torch.randn(1, 256, 28, 28)
    qm = binary_layer(conv, x)
    ig = graphopt.to_integer(qm, (x,))
    host = {"fp32": graphopt.compile(conv, (x,), "host", progress=False),
            "binary": graphopt.compile(qm, (x,), "host", progress=False)}
    if not torch.equal(host["binary"](x), ig(x)):
        raise SystemExit("binary layer is not bit-exact vs the folded integer graph")
    ms = median_ms(host, x, a.runs)
    print(f"host: fp32 {ms['fp32']:.3f} ms, binary a1w1 {ms['binary']:.3f} ms, "
          f"speed-up {ms['fp32'] / ms['binary']:.1f}x (target >= 10x)")
    if a.no_arm:
        return
    counts = {}
    for name, model in (("fp32", conv), ("binary", qm)):
        cm = graphopt.compile(model, (x,), a.arm_target, progress=False, count_instructions=True)
        counts[name] = cm.report.instructions_per_inference
        if counts[name] is None:
            raise SystemExit(f"no instruction count on {a.arm_target}: {cm.report.instructions_note}")
    print(f"{a.arm_target} (qemu, instructions per inference, a proxy): fp32 {counts['fp32']:,}, "
          f"binary a1w1 {counts['binary']:,}, ratio {counts['binary'] / counts['fp32']:.3f} (target <= 0.1)")


if __name__ == "__main__":
    main()
