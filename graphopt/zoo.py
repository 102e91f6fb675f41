"""Bundled model zoo: small models with seeded weights, each with its expected compile outcome.

Every entry is a factory returning ``(model, example_inputs)`` (the CLI's factory format) and
an `Expect` — the outcome graphopt must produce. The test suite compiles each entry and fails
on any *unexpected* result, including an unexpected pass (torch-mlir's xfail discipline).
Third-party entries build `transformers` models from configs with random weights; no download.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class Expect(str, enum.Enum):
    PASS = "pass"  # compiles and matches PyTorch
    UNSUPPORTED = "unsupported"  # refused with LoweringError/CaptureError listing the ops


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Callable[[], tuple[nn.Module, tuple]]
    expect: Expect = Expect.PASS
    needs: tuple[str, ...] = ()  # optional packages
    note: str = ""


def recalibrate_bn(model: nn.Module, example: tuple, steps: int = 4, seed: int = 0) -> nn.Module:
    """Give fresh BatchNorms realistic running statistics (random inputs, train-mode forwards), then eval.

    Random-init BN with default statistics can shrink activations to ~1e-30, which makes any
    numeric comparison meaningless.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g) if m.weight is not None else None
                m.bias.uniform_(-0.2, 0.2, generator=g) if m.bias is not None else None
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(*[torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t for t in example])
    return model.eval()


class PlainCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(0.25))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResidualCNN(nn.Module):
    def __init__(self, cin: int = 3, classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(cin, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def conv_bn_relu6(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (skipped at expand=1), 3×3 depthwise, 1×1 project, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        layers = conv_bn_relu6(cin, hidden, 1) if expand != 1 else []
        layers += conv_bn_relu6(hidden, hidden, 3, stride, hidden)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetBlocks(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
                                    InvertedResidual(24, 24, 1), nn.Conv2d(24, 32, 3, 1, 1, groups=4))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ResNet18(nn.Module):
    """ResNet-18 (ImageNet layout) for benchmarks at 224×224."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, c = [], 64
        for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
            blocks.append(BasicBlock(c, cout, stride))
            c = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0, ImageNet layout) for benchmarks at 224×224."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, c = conv_bn_relu6(3, 32, 3, 2), 32
        for t, cout, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                              (6, 160, 3, 2), (6, 320, 1, 1)]:
            for i in range(n):
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        layers += conv_bn_relu6(c, 1280, 1)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4, layers: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.encoder(self.embed(tokens) + self.pos[:, : tokens.shape[1]])
        return self.head(self.norm(h).mean(1))


def _seeded(build: Callable[[], tuple[nn.Module, tuple]]) -> Callable[[], tuple[nn.Module, tuple]]:
    def factory():
        torch.manual_seed(0)
        model, inputs = build()
        return recalibrate_bn(model, inputs), inputs
    factory.__name__ = build.__name__
    factory.__doc__ = build.__doc__
    return factory


@_seeded
def plain_cnn():
    """Fashion-MNIST-sized plain CNN (1×28×28)."""
    return PlainCNN(), (torch.randn(1, 1, 28, 28),)


@_seeded
def residual_cnn():
    """ResNet-style CNN with projection shortcuts (3×32×32)."""
    return ResidualCNN(), (torch.randn(1, 3, 32, 32),)


@_seeded
def mobilenet_blocks():
    """MobileNetV2-style inverted residuals with depthwise and grouped convs (3×32×32)."""
    return MobileNetBlocks(), (torch.randn(1, 3, 32, 32),)


@_seeded
def tiny_transformer():
    """Two-layer transformer encoder over 16 tokens."""
    return TinyTransformer(), (torch.randint(0, 100, (1, 16)),)


class _Logits(nn.Module):
    """Unwrap a transformers model's output to its logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


@_seeded
def hf_resnet():
    """transformers ResNetForImageClassification from a small config (random weights)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], num_labels=10,
                       layer_type="basic")
    return _Logits(ResNetForImageClassification(cfg)), (torch.randn(1, 3, 64, 64),)


@_seeded
def hf_mobilenet_v2():
    """transformers MobileNetV2ForImageClassification, depth multiplier 0.35 (random weights)."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(depth_multiplier=0.35, image_size=64, num_labels=10)
    return _Logits(MobileNetV2ForImageClassification(cfg)), (torch.randn(1, 3, 64, 64),)


@_seeded
def hf_bert_tiny():
    """transformers BertForSequenceClassification, 2 layers × 64 hidden (random weights)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=32, num_labels=3)
    return _Logits(BertForSequenceClassification(cfg)), (torch.randint(0, 200, (1, 16)),)


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("plain_cnn", plain_cnn),
    ZooEntry("residual_cnn", residual_cnn),
    ZooEntry("mobilenet_blocks", mobilenet_blocks),
    ZooEntry("tiny_transformer", tiny_transformer),
    ZooEntry("hf_resnet", hf_resnet, needs=("transformers",)),
    ZooEntry("hf_mobilenet_v2", hf_mobilenet_v2, needs=("transformers",)),
    ZooEntry("hf_bert_tiny", hf_bert_tiny, needs=("transformers",)),
)}
