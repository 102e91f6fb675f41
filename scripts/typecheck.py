"""Type-check graphopt with mypy as it is installed: one package ``graphopt`` whose ``passes`` and
``targets`` come from the top-level folders of the same names (pyproject's package-dir).

mypy maps module names to files by folders and cannot follow that mapping, so this script lays
the installed shape out as symbolic links in a scratch folder, runs mypy there with pyproject's
[tool.mypy] settings, and prints the findings with the repository's own paths. Exit code: mypy's.

    python scripts/typecheck.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="graphopt-typecheck-") as tmp:
        pkg = Path(tmp) / "graphopt"
        pkg.mkdir()
        for entry in (ROOT / "graphopt").iterdir():
            if entry.name != "__pycache__":
                (pkg / entry.name).symlink_to(entry)
        (pkg / "passes").symlink_to(ROOT / "passes")
        (pkg / "targets").symlink_to(ROOT / "targets")
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
               "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "graphopt"]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env={**os.environ, "MYPYPATH": ""})
    out = (proc.stdout + proc.stderr).replace("graphopt/passes/", "passes/").replace("graphopt/targets/", "targets/")
    print(out, end="")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
