"""Offline datasets that ship in packages: Fashion-MNIST from Debian's `dataset-fashion-mnist`.

Nothing is downloaded. Refuses (with the apt command to run) when the package is not installed.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from graphopt.errors import ConfigError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
# Per-pixel statistics of the 60k training images (scaled to [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def fashion_mnist(split: str = "train", *, limit: int | None = None, root: Path = FASHION_MNIST_DIR) -> TensorDataset:
    """Normalized ``(N, 1, 28, 28)`` float images and int64 labels; ``split`` is "train" (60k) or "test" (10k)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise ConfigError(f"Fashion-MNIST not found under {root}; install it with "
                          "`apt-get install dataset-fashion-mnist` (scripts/setup.sh does this)")
    x = _idx(images, 16).reshape(-1, 1, 28, 28)[:limit]
    y = _idx(labels, 8)[:limit]
    xt = (torch.from_numpy(x.astype(np.float32)) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return TensorDataset(xt, torch.from_numpy(y.astype(np.int64)))
