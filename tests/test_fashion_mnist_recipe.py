"""The recipe on real Fashion-MNIST (Debian's 60k/10k): the issue's accuracy and compute claims."""
import importlib.util
from pathlib import Path

import pytest

from graphopt.datasets import FASHION_MNIST_DIR

pytestmark = [pytest.mark.slow]


def _example():
    path = Path(__file__).parent.parent / "examples" / "fashion_mnist_recipe.py"
    spec = importlib.util.spec_from_file_location("fashion_mnist_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_on_fashion_mnist(tmp_path):
    if not FASHION_MNIST_DIR.exists():
        pytest.fail("Fashion-MNIST missing: scripts/setup.sh installs dataset-fashion-mnist")
    figures = _example().run(target="host", epochs=2, out=tmp_path, progress=False)
    print(figures)
    assert figures["teacher_accuracy"] > 0.88
    assert figures["macs_reduction"] >= 3.0
    assert figures["final_step"] == "int8 PTQ"
    assert figures["final_accuracy"] >= figures["teacher_accuracy"] - 0.01
    assert figures["student_distilled_accuracy"] > figures["student_scratch_accuracy"]
    assert (tmp_path / "optimize.png").exists() and (tmp_path / "artifact" / "model.so").exists()
