"""Run a benchmark at an earlier commit and on the working tree side by side: before/after figures from one
session. Instruction counts under QEMU are deterministic within a session, but the TVM VM's drift by ~1 %
between sessions, so pairs measured on different days do not compare.

    python benchmarks/against.py b06e9ab -- int8.py --no-host --no-m4 --no-arm

The commit is checked out with ``git worktree`` into a temporary directory, removed afterwards with its
registration; its graphopt is imported from there ahead of the editable install (a package directory with
the commit's ``graphopt/``, ``passes/`` and ``targets/`` laid out as installed), so both runs use this
environment's torch, TVM and cross tools. Both benchmarks run at once (``--sequential``: one after the
other, for latency figures, which a concurrent run disturbs). Their outputs are printed in turn, then each
``int8 / fp32`` line of both, before → after. Refuses a commit git cannot check out, and a layout without
those three directories.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RATIO = re.compile(r"^\s*(?P<target>[\w.-]+): fp32 (?P<fp32>[\d,]+)\s+int8 (?P<int8>[\d,]+)\s+int8 / fp32 "
                   r"(?P<ratio>[\d.]+)")


def ratios(output: str) -> dict[tuple[str, str], str]:
    """``{(section, target): "int8 (ratio)"}`` of a benchmark's ``int8 / fp32`` lines; a section is the last
    line ending with a colon above (e.g. ``zoo mobilenet_blocks (1, 3, 32, 32):``)."""
    found, section = {}, ""
    for line in output.splitlines():
        if (m := RATIO.match(line)) is not None:
            found[(section, m["target"])] = f"{m['int8']} ({m['ratio']})"
        elif line.rstrip().endswith(":"):
            section = line.strip().rstrip(":")
    return found


def _package(tree: Path, into: Path) -> Path:
    """A directory importing the commit at `tree` as ``graphopt`` (``passes``/``targets`` inside, as
    installed)."""
    missing = [d for d in ("graphopt", "passes", "targets") if not (tree / d).is_dir()]
    if missing:
        sys.exit(f"against: the commit has no {', '.join(missing)} directory: not this layout")
    package = into / "graphopt"
    shutil.copytree(tree / "graphopt", package)
    for sub in ("passes", "targets"):
        (package / sub).symlink_to(tree / sub, target_is_directory=True)
    return into


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the commit to measure against (anything git rev-parse takes)")
    p.add_argument("--sequential", action="store_true", help="run one after the other (for latencies)")
    p.add_argument("benchmark", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]: a script in benchmarks/")
    args = p.parse_args()
    command = args.benchmark[1:] if args.benchmark[:1] == ["--"] else args.benchmark
    if not command:
        p.error("name the benchmark after --, e.g. -- int8.py --no-host")
    with tempfile.TemporaryDirectory(prefix="graphopt-against-") as tmp:
        tree = Path(tmp) / "tree"
        if subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), args.rev],
                          check=False).returncode:
            sys.exit(f"against: git could not check out {args.rev!r}")
        try:
            path = os.pathsep.join(filter(None, [str(_package(tree, Path(tmp) / "pkg")),
                                                 os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "PYTHONPATH": path}
            where = subprocess.run([sys.executable, "-c", "import graphopt.targets; print(graphopt.targets.__file__)"],
                                   env=env, cwd=tmp, capture_output=True, text=True, check=True).stdout
            if not where.startswith(tmp):
                sys.exit(f"against: the commit's graphopt did not take precedence ({where.strip()})")
            runs = {f"{args.rev} (before)": ([sys.executable, str(tree / "benchmarks" / command[0]), *command[1:]],
                                             tree, env),
                    "working tree (after)": ([sys.executable, str(REPO / "benchmarks" / command[0]), *command[1:]],
                                             REPO, dict(os.environ))}
            outputs = {}
            started = {}
            for label, (cmd, cwd, environ) in runs.items():
                started[label] = subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True)
                if args.sequential:
                    outputs[label] = started[label].communicate()[0]
            for label, proc in started.items():
                if label not in outputs:
                    outputs[label] = proc.communicate()[0]
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    for label, out in outputs.items():
        print(f"===== {label}\n{out}")
    (before_label, before), (after_label, after) = outputs.items()
    pairs = ratios(before), ratios(after)
    if pairs[0] or pairs[1]:
        print(f"===== int8 / fp32: {before_label} → {after_label}")
        for key in dict.fromkeys([*pairs[0], *pairs[1]]):
            print(f"  {key[0]} · {key[1]}: {pairs[0].get(key, '-')} → {pairs[1].get(key, '-')}")
    failed = [label for label, proc in started.items() if proc.returncode]
    if failed:
        sys.exit(f"against: {', '.join(failed)} exited with an error")


if __name__ == "__main__":
    main()
