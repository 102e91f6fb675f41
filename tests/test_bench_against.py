"""benchmarks/against.py: its reading of a benchmark's ``int8 / fp32`` lines, and its refusal of a commit git
cannot check out (no worktree left behind)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "against.py"


def _module():
    spec = importlib.util.spec_from_file_location("against_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_lines_are_keyed_by_section_and_target():
    output = """aarch64 zoo models: instructions per inference under qemu-aarch64 (PROXY, not time)
  zoo mobilenet_blocks (1, 3, 32, 32):
    arm-a53: fp32 809,191  int8 644,312  int8 / fp32 0.796
  FAIL  arm-a53 mobilenet_blocks: instructions int8 / fp32: 0.796 (required <= 0.75)
    arm-a55-c: fp32 788,760  int8 303,871  int8 / fp32 0.385
  zoo depthwise_concat (1, 3, 32, 32):
    arm-a53: fp32 930,206  int8 732,750  int8 / fp32 0.788
"""
    assert _module().ratios(output) == {
        ("zoo mobilenet_blocks (1, 3, 32, 32)", "arm-a53"): "644,312 (0.796)",
        ("zoo mobilenet_blocks (1, 3, 32, 32)", "arm-a55-c"): "303,871 (0.385)",
        ("zoo depthwise_concat (1, 3, 32, 32)", "arm-a53"): "732,750 (0.788)",
    }


def test_unknown_commit_is_refused_without_debris():
    repo = SCRIPT.parent.parent
    before = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True).stdout
    run = subprocess.run([sys.executable, str(SCRIPT), "no-such-commit-0123", "--", "int8.py"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "could not check out 'no-such-commit-0123'" in run.stderr
    after = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True).stdout
    assert after == before
