"""Small models, one per quantization pattern, and helpers shared by the quantization tests."""
from __future__ import annotations

import torch
from torch import nn


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw, self.dw, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), \
            nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(nn.functional.relu6(self.dw(self.pw(x))))


class Depthwise64(nn.Module):
    """MobileNetV2's 64-channel depthwise 3×3 at 16×16 (inside the zoo's mobilenet_blocks): 16→64 1×1, the
    depthwise conv (padding 1), 64→16 1×1."""

    def __init__(self):
        super().__init__()
        self.pw, self.dw = nn.Conv2d(16, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv2d(64, 16, 1)

    def forward(self, x):
        return self.project(nn.functional.relu6(self.dw(torch.relu(self.pw(x)))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return self.c3(torch.relu(self.c2(y) + y))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1))


class Pooling(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        y = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        y = nn.functional.avg_pool2d(self.c2(y), 2)
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


class HardswishSigmoid(nn.Module):
    """hardswish and sigmoid fold into 256-entry lookup tables (qlut), exact vs. their QDQ form."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8 * 64, 6)

    def forward(self, x):
        y = nn.functional.hardswish(self.c1(x))
        return self.fc(torch.sigmoid(self.c2(y)).flatten(1))


PATTERNS = {"conv_bn_relu": ConvBnRelu, "depthwise": Depthwise, "residual_add": Residual, "concat": Concat,
            "pooling": Pooling, "hardswish_sigmoid": HardswishSigmoid}


def ready(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics (a few train-mode passes), then eval."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8))
    return model.eval()


def calibration(n: int = 4, batch: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]
