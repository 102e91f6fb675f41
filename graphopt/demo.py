"""The main job: compile a bundled model for ARM, run it under QEMU, print the report and the error.

    python -m graphopt.demo [--target arm] [--model residual_cnn] [--out build/demo]
"""
from __future__ import annotations

import argparse
import sys

import torch

import graphopt
from graphopt.passes.manager import max_rel_error
from graphopt.zoo import ZOO


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphopt.demo", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="arm")
    p.add_argument("--model", default="residual_cnn", choices=sorted(ZOO))
    p.add_argument("--out", default="build/demo")
    a = p.parse_args(argv)

    model, inputs = ZOO[a.model].factory()
    try:
        cm = graphopt.compile(model, inputs, target=a.target)
        path = cm.save(a.out)
        print(cm.report.to_markdown() if cm.report is not None else "")
        got = cm(*inputs)
    except graphopt.GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return 2
    with torch.no_grad():
        want = model(*inputs)
    err = max_rel_error(got, want)
    where = f"qemu-aarch64 -cpu {cm.target.qemu_cpu}" if cm.target.is_emulated else "host"
    print(f"artifact: {path}")
    print(f"ran on: {where}")
    print(f"max |graphopt − PyTorch| / max|PyTorch| = {err:.3e}")
    return 0 if err <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
