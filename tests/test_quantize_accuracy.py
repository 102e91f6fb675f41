"""Accuracy of quantized models on real Fashion-MNIST (apt package dataset-fashion-mnist).

A small CNN is trained once per session (~1 epoch); accuracies are measured on the 10k test set
with the folded *integer* graph (graphopt.qops in PyTorch), and printed (run with -s to see them).
"""
from __future__ import annotations

import pytest
import torch
from conftest import IN_CI
from torch import nn

import graphopt
from graphopt.datasets import FASHION_MNIST_DIR, fashion_mnist


@pytest.fixture(scope="session")
def fmnist():
    if not FASHION_MNIST_DIR.exists():
        if IN_CI:
            pytest.fail("Fashion-MNIST missing; scripts/setup.sh installs dataset-fashion-mnist")
        pytest.skip("needs apt package dataset-fashion-mnist (scripts/setup.sh)")
    train, test = fashion_mnist("train"), fashion_mnist("test")
    return (*train.tensors, *test.tensors)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        y = torch.relu(self.b2(self.c2(x)))
        y = torch.relu(self.b3(self.c3(y)) + y)
        return self.fc(nn.functional.max_pool2d(y, 2).flatten(1))


def _train(model, xs, ys, *, steps: int, lr: float, batch: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (batch,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
        opt.step()
        sched.step()
    return model


def _accuracy(fn, xs, ys) -> float:
    with torch.no_grad():
        hits = sum(int((fn(xs[i:i + 1000]).argmax(1) == ys[i:i + 1000]).sum()) for i in range(0, len(xs), 1000))
    return 100.0 * hits / len(xs)


@pytest.fixture(scope="session")
def trained(fmnist):
    torch.manual_seed(0)
    xs, ys, xt, yt = fmnist
    model = _train(SmallCNN(), xs, ys, steps=350, lr=3e-3).eval()
    acc = _accuracy(model, xt, yt)
    print(f"\n[fashion-mnist] fp32 accuracy {acc:.2f}%")
    return model, acc


def _integer_accuracy(qm, xt, yt) -> float:
    ig = graphopt.to_integer(qm, (xt[:2],))
    return _accuracy(ig, xt, yt)


def test_int8_ptq_within_one_point_of_fp32(fmnist, trained):
    xs, _, xt, yt = fmnist
    model, fp32 = trained
    cal = [xs[i:i + 256] for i in range(0, 2048, 256)]
    qm = graphopt.quantize(model, (xt[:2],), calibration=cal,
                           scheme=graphopt.QuantScheme(weights=8, activations=8, per_channel=True))
    acc = _integer_accuracy(qm, xt, yt)
    print(f"[fashion-mnist] int8 PTQ (integer graph) {acc:.2f}% vs fp32 {fp32:.2f}%")
    assert acc >= fp32 - 1.0


@pytest.mark.slow
def test_int4_weight_qat_within_two_points_of_fp32(fmnist, trained):
    xs, ys, xt, yt = fmnist
    model, fp32 = trained
    qat = graphopt.prepare_qat(model, (xt[:2],), scheme=graphopt.QuantScheme(weights=4, activations=8),
                               calibration=[xs[i:i + 256] for i in range(0, 1024, 256)])
    _train(qat, xs, ys, steps=150, lr=3e-4, seed=1)
    acc = _integer_accuracy(graphopt.convert(qat), xt, yt)
    print(f"[fashion-mnist] int4-weight QAT (integer graph) {acc:.2f}% vs fp32 {fp32:.2f}%")
    assert acc >= fp32 - 2.0


@pytest.mark.slow
def test_binary_network_accuracy_is_reported(fmnist, trained):
    xs, ys, xt, yt = fmnist
    model, fp32 = trained
    bm = graphopt.binarize(model, (xt[:2],), keep_first_last=True, calibration=[xs[:512]])
    _train(bm, xs, ys, steps=300, lr=1e-3, seed=2)
    acc = _integer_accuracy(graphopt.convert(bm), xt, yt)
    print(f"[fashion-mnist] binary weights, first/last 8-bit (integer graph) {acc:.2f}% vs fp32 {fp32:.2f}%")
    assert acc > 10.0 + 5.0  # trains beyond chance; no accuracy threshold yet (issue 6)
