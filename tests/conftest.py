import os
import shutil

import pytest
import torch

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Every test builds what it compiles (a cached artifact would hide what a test changed in lowering);
# tests/test_build_cache.py points the cache at its own folders.
os.environ["GRAPHOPT_BUILD_CACHE"] = "off"


def saturating_inputs(shape) -> list[torch.Tensor]:
    """Inputs that saturate the input quantizer (all −128, all 127, mixed extremes), then ordinary values."""
    g = torch.Generator().manual_seed(3)
    signs = torch.sign(torch.randn(shape, generator=g))
    return [torch.full(shape, -1e3), torch.full(shape, 1e3), 1e3 * signs,
            torch.randn(shape, generator=g), 4 * torch.randn(shape, generator=g)]


def require_tools(*tools: str) -> None:
    """Skip outside CI when an external tool is missing; in CI the setup step must have installed it."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        if IN_CI:
            pytest.fail(f"CI is missing {missing}; scripts/setup.sh must install them")
        pytest.skip(f"needs {missing} (run scripts/setup.sh)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
