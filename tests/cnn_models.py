"""torchvision-style CNNs written as their sources are, for the integer-folding tests.

ResNet-18 (`BasicBlock`: ``out += identity``), MobileNetV2 (ReLU6, ``x + self.conv(x)``),
MobileNetV3-small (hardswish, squeeze-excite ``scale * input`` with hardsigmoid), EfficientNet-B0
(SiLU, squeeze-excite with sigmoid, ``result += input``, dropout) and a DenseNet (pre-activation
BatchNorm after ``torch.cat``, transition average pooling) plus a ShuffleNetV2 unit (chunk, channel
shuffle). ``inplace=True`` spells activations and residual adds the way torchvision does
(``nn.ReLU(inplace=True)``, ``out += identity``); ``inplace=False`` the functional way. ``width``
scales every channel count (torchvision's sizes at 1.0) so tests stay small.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F


def _c(channels: float, width: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible of ``channels · width``."""
    v = channels * width
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _add(out, identity, inplace: bool):
    if inplace:
        out += identity
        return out
    return out + identity


class ConvNormAct(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU, inplace=True):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=inplace))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: ``scale * input``."""

    def __init__(self, cin, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(cin, squeeze, 1), nn.Conv2d(squeeze, cin, 1)
        self.activation, self.scale_activation = activation(), scale_activation()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


# ---- ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, inplace):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.inplace = inplace

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(_add(out, identity, self.inplace))


class ResNet18(nn.Module):
    def __init__(self, width: float = 1.0, classes: int = 1000, inplace: bool = True):
        super().__init__()
        c = _c(64, width)
        self.conv1, self.bn1 = nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c)
        self.relu, self.maxpool = nn.ReLU(inplace=inplace), nn.MaxPool2d(3, 2, 1)
        layers = []
        for i, planes in enumerate((64, 128, 256, 512)):
            cout = _c(planes, width)
            layers.append(nn.Sequential(BasicBlock(c, cout, 1 if i == 0 else 2, inplace),
                                        BasicBlock(cout, cout, 1, inplace)))
            c = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(c, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---- MobileNetV2
class InvertedResidualV2(nn.Module):
    def __init__(self, cin, cout, stride, expand, inplace):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res_connect = stride == 1 and cin == cout
        layers = [ConvNormAct(cin, hidden, 1, act=nn.ReLU6, inplace=inplace)] if expand != 1 else []
        layers += [ConvNormAct(hidden, hidden, 3, stride, hidden, nn.ReLU6, inplace),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0, classes: int = 1000, inplace: bool = True):
        super().__init__()
        c = _c(32, width)
        features = [ConvNormAct(3, c, stride=2, act=nn.ReLU6, inplace=inplace)]
        for t, ch, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                            (6, 160, 3, 2), (6, 320, 1, 1)]:
            for i in range(n):
                features.append(InvertedResidualV2(c, _c(ch, width), s if i == 0 else 1, t, inplace))
                c = _c(ch, width)
        last = _c(1280, max(1.0, width))
        features.append(ConvNormAct(c, last, 1, act=nn.ReLU6, inplace=inplace))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ---- MobileNetV3-small and EfficientNet-B0
class InvertedResidualV3(nn.Module):
    def __init__(self, cin, k, expanded, cout, use_se, use_hs, stride, inplace):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if use_hs else nn.ReLU
        layers = [ConvNormAct(cin, expanded, 1, act=act, inplace=inplace)] if expanded != cin else []
        layers.append(ConvNormAct(expanded, expanded, k, stride, expanded, act, inplace))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _c(expanded // 4, 1.0), scale_activation=nn.Hardsigmoid))
        layers.append(ConvNormAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.inplace = inplace

    def forward(self, x):
        result = self.block(x)
        return _add(result, x, self.inplace) if self.use_res_connect else result


class MobileNetV3Small(nn.Module):
    SETTING = [(16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2), (24, 3, 88, 24, False, False, 1),
               (24, 5, 96, 40, True, True, 2), (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
               (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1), (48, 5, 288, 96, True, True, 2),
               (96, 5, 576, 96, True, True, 1), (96, 5, 576, 96, True, True, 1)]

    def __init__(self, width: float = 1.0, classes: int = 1000, inplace: bool = True):
        super().__init__()
        c = _c(16, width)
        layers = [ConvNormAct(3, c, 3, 2, act=nn.Hardswish, inplace=inplace)]
        for cin, k, exp, cout, se, hs, s in self.SETTING:
            layers.append(InvertedResidualV3(_c(cin, width), k, _c(exp, width), _c(cout, width), se, hs, s, inplace))
        c = _c(96, width)
        layers.append(ConvNormAct(c, 6 * c, 1, act=nn.Hardswish, inplace=inplace))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * c, 1024), nn.Hardswish(inplace=inplace),
                                        nn.Dropout(0.2, inplace=inplace), nn.Linear(1024, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, k, stride, inplace):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = _c(cin, expand)
        layers = [ConvNormAct(cin, hidden, 1, act=nn.SiLU, inplace=inplace)] if hidden != cin else []
        layers += [ConvNormAct(hidden, hidden, k, stride, hidden, nn.SiLU, inplace),
                   SqueezeExcitation(hidden, max(1, cin // 4), activation=partial(nn.SiLU, inplace=inplace)),
                   ConvNormAct(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.inplace = inplace

    def forward(self, x):
        result = self.block(x)  # stochastic depth is the identity in eval
        return _add(result, x, self.inplace) if self.use_res_connect else result


class EfficientNetB0(nn.Module):
    SETTING = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
               (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]

    def __init__(self, width: float = 1.0, classes: int = 1000, inplace: bool = True):
        super().__init__()
        layers = [ConvNormAct(3, _c(32, width), 3, 2, act=nn.SiLU, inplace=inplace)]
        for e, k, s, cin, cout, n in self.SETTING:
            for i in range(n):
                c_in = _c(cin if i == 0 else cout, width)
                layers.append(MBConv(c_in, _c(cout, width), e, k, s if i == 0 else 1, inplace))
        last = 4 * _c(320, width)
        layers.append(ConvNormAct(_c(320, width), last, 1, act=nn.SiLU, inplace=inplace))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=inplace), nn.Linear(last, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---- DenseNet
class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size, inplace):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=inplace)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]):
        concated = torch.cat(features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))  # dropout rate 0


class DenseNet(nn.Module):
    """DenseNet-121's layout with fewer layers per block (``blocks``)."""

    def __init__(self, growth: int = 32, blocks=(6, 12, 24, 16), init: int = 64, bn_size: int = 4,
                 classes: int = 1000, inplace: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, init, 7, 2, 3, bias=False), nn.BatchNorm2d(init),
                                  nn.ReLU(inplace=inplace), nn.MaxPool2d(3, 2, 1))
        self.blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
        c = init
        for i, n in enumerate(blocks):
            self.blocks.append(nn.ModuleList(DenseLayer(c + j * growth, growth, bn_size, inplace) for j in range(n)))
            c += n * growth
            if i != len(blocks) - 1:
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=inplace),
                                                      nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)))
                c //= 2
        self.norm5, self.classifier = nn.BatchNorm2d(c), nn.Linear(c, classes)
        self.inplace = inplace

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            features = [x]
            for layer in block:
                features.append(layer(features))
            x = torch.cat(features, 1)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        out = F.relu(self.norm5(x), inplace=self.inplace)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


# ---- ShuffleNetV2 unit
def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """torchvision's InvertedResidual of ShuffleNetV2 (stride 1): chunk, branch, cat, shuffle."""

    def __init__(self, c, inplace):
        super().__init__()
        b = c // 2
        self.branch2 = nn.Sequential(nn.Conv2d(b, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=inplace),
                                     nn.Conv2d(b, b, 3, 1, 1, groups=b, bias=False), nn.BatchNorm2d(b),
                                     nn.Conv2d(b, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=inplace))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)


class ShuffleNetTiny(nn.Module):
    def __init__(self, c: int = 24, classes: int = 10, inplace: bool = True):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=inplace))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage = nn.Sequential(ShuffleUnit(c, inplace), ShuffleUnit(c, inplace))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.stage(self.maxpool(self.conv1(x))).mean([2, 3]))


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


# name → (factory(inplace) -> model, input size): small widths so the tests compile quickly
MODELS = {
    "resnet18": (lambda inplace: ResNet18(0.25, 10, inplace), 32),
    "mobilenet_v2": (lambda inplace: MobileNetV2(0.25, 10, inplace), 32),
    "mobilenet_v3_small": (lambda inplace: MobileNetV3Small(0.25, 10, inplace), 32),
    "efficientnet_b0": (lambda inplace: EfficientNetB0(0.25, 10, inplace), 32),
    "densenet": (lambda inplace: DenseNet(8, (2, 3), 16, 2, 10, inplace), 32),
    "shufflenet_unit": (lambda inplace: ShuffleNetTiny(24, 10, inplace), 32),
}


def build(name: str, inplace: bool, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, size = MODELS[name]
    torch.manual_seed(seed)
    model = _init(factory(inplace), seed)
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))


def calibration(size: int = 32, n: int = 4, batch: int = 4, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]
