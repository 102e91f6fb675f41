"""torchvision-style CNNs (`graphopt.torchvision_style`: in-place activations, ``out += identity``,
squeeze-excite ``scale * input``, channel shuffle, DenseNet's concat → BatchNorm) at small widths and
32×32 inputs, with seeded weights, for the integer-folding tests."""
from __future__ import annotations

import torch
from torch import nn

from graphopt import torchvision_style as tv

# name → factory: small widths so the tests fold and compile quickly
MODELS = {
    "resnet18": lambda: tv.resnet18(10, width=16),
    "mobilenet_v2": lambda: tv.MobileNetV2(10, width_mult=0.25),
    "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(10, width_mult=0.25),
    "efficientnet_b0": lambda: tv.EfficientNet(width_mult=0.25, depth_mult=0.5, num_classes=10),
    "densenet": lambda: tv.DenseNet(8, (2, 3), 16, 2, num_classes=10),
    "shufflenet_v2": lambda: tv.shufflenet_v2_x0_5(10),
}
SIZE = 32


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights and BatchNorm statistics that keep activations O(1) (as trained models do)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1, generator=g)
    return model.eval()


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = _init(MODELS[name](), seed)
    return model, torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1))


def calibration(size: int = SIZE, n: int = 4, batch: int = 4, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]
