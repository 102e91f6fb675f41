"""Bundled model zoo: small models with seeded weights, each with its expected compile outcome.

Every entry is a factory returning ``(model, example_inputs)`` (the CLI's factory format) and
an `Expect` — the outcome graphopt must produce. The test suite compiles each entry and fails
on any *unexpected* result, including an unexpected pass (torch-mlir's xfail discipline).
Third-party entries build `transformers` models from configs with random weights; no download.

`REAL_CODE` is the zoo of code as people write it: torchvision's architectures written out as
torchvision writes them (`graphopt.torchvision_style`), pytorchcv's and transformers' own classes,
each with its recorded outcome per check (`Check`): fp32 MACs, fp32 ops left in the int8 graph,
and which compile checks fail today.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from graphopt.torchvision_style import BasicBlock as TVBasicBlock
from graphopt.torchvision_style import Conv2dNormActivation, InvertedResidualV2, conv1x1, conv3x3


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


def recalibrate_bn(model: nn.Module, example: tuple, steps: int = 4, seed: int = 0, batch: int | None = None
                   ) -> nn.Module:
    """Give fresh BatchNorms realistic running statistics (random inputs, train-mode forwards), then eval.

    Random-init BN with default statistics can shrink activations to ~1e-30, which makes any
    numeric comparison meaningless. ``batch`` overrides the example's batch size (train-mode BN
    after a global pool needs more than one value per channel).
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g) if m.weight is not None else None
                m.bias.uniform_(-0.2, 0.2, generator=g) if m.bias is not None else None
    if batch is not None:
        example = tuple(t[:1].expand(batch, *t.shape[1:]) for t in example)
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


class DepthwiseConcat(nn.Module):
    """Residual + depthwise + concat + linear, written as torchvision writes MobileNetV2
    (`torchvision_style`: ``Conv2dNormActivation``, in-place ReLU6, ``x + self.conv(x)``): inverted
    residuals, a block concatenating a 1×1 branch and a depthwise-separable branch, an inverted
    residual over the concatenation, global average pool and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = Conv2dNormActivation(3, 16, stride=2, activation_layer=nn.ReLU6)
        self.blocks = nn.Sequential(InvertedResidualV2(16, 16, 1, 4), InvertedResidualV2(16, 24, 2, 4),
                                    InvertedResidualV2(24, 24, 1, 4))
        self.pointwise = Conv2dNormActivation(24, 16, kernel_size=1, activation_layer=nn.ReLU6)
        self.separable = nn.Sequential(Conv2dNormActivation(24, 24, groups=24, activation_layer=nn.ReLU6),
                                       Conv2dNormActivation(24, 16, kernel_size=1, activation_layer=nn.ReLU6))
        self.mix = InvertedResidualV2(32, 32, 1, 2)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = self.mix(torch.cat([self.pointwise(x), self.separable(x)], 1))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


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


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016: 3 stages of 3 basic blocks, 16/32/64 channels) for benchmarks at
    32×32, written with torchvision's blocks (``ReLU(inplace=True)``, ``out += identity``, 1×1 projection
    shortcuts where the shape changes)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        blocks, c = [], 16
        for cout, stride in [(16, 1)] * 3 + [(32, 2), (32, 1), (32, 1), (64, 2), (64, 1), (64, 1)]:
            down = None if stride == 1 and c == cout else nn.Sequential(conv1x1(c, cout, stride),
                                                                        nn.BatchNorm2d(cout))
            blocks.append(TVBasicBlock(c, cout, stride, down))
            c = cout
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


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


def _seeded(build: Callable[[], tuple[nn.Module, tuple]], batch: int | None = None
            ) -> Callable[[], tuple[nn.Module, tuple]]:
    def factory():
        torch.manual_seed(0)
        model, inputs = build()
        return recalibrate_bn(model, inputs, batch=batch), inputs
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
def depthwise_concat():
    """Inverted residuals, a concat of a 1×1 and a depthwise-separable branch, a linear head (3×32×32)."""
    return DepthwiseConcat(), (torch.randn(1, 3, 32, 32),)


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
    ZooEntry("depthwise_concat", depthwise_concat),
    ZooEntry("tiny_transformer", tiny_transformer),
    ZooEntry("hf_resnet", hf_resnet, needs=("transformers",)),
    ZooEntry("hf_mobilenet_v2", hf_mobilenet_v2, needs=("transformers",)),
    ZooEntry("hf_bert_tiny", hf_bert_tiny, needs=("transformers",)),
)}


# ------------------------------------------------------------------------------------------------
# Real code: models written as their upstream sources are (torchvision-style, pytorchcv, transformers),
# each with the outcomes graphopt produces today. tests/test_real_code.py checks every one and fails
# on any difference, an unexpected pass included; its message names the value to set in the table.


class Check(str, enum.Enum):
    """What the real-code zoo checks per model (and per target: host and emulated aarch64)."""

    FP32_HOST = "fp32-host"  # compile matches eager within 1e-4
    FP32_ARM = "fp32-arm"
    INT8_HOST = "int8-host"  # graphopt.quantize + compile is bit-exact to the folded integer fx graph
    INT8_ARM = "int8-arm"
    INT8_MACS = "int8-macs"  # the folded int8 graph reports the fp32 graph's MACs (true cost)


@dataclass(frozen=True)
class RealCodeEntry:
    name: str
    factory: Callable[[], tuple[nn.Module, tuple]]
    source: str  # whose code: "torchvision-style", "pytorchcv", "transformers"
    macs: int  # MACs after the default passes (fp32)
    float_ops: int  # fp32 ops left between quantize and dequantize in the folded int8 graph
    fails: frozenset[Check] = frozenset()  # checks expected to fail today
    needs: tuple[str, ...] = ()  # optional packages
    note: str = ""  # why float ops are left or a check fails
    int8_macs: int | None = None  # MACs of the int8 graph where they differ from ``macs`` (see REAL_CODE)


def _final_pool_adaptive(model: nn.Module) -> nn.Module:
    """pytorchcv ends in ``AvgPool2d(7)`` sized for 224×224 inputs; the adaptive pool computes the
    same there and lets the zoo use small inputs."""
    for m in model.modules():
        for name, child in m.named_children():
            if name == "final_pool" and isinstance(child, nn.AvgPool2d):
                setattr(m, name, nn.AdaptiveAvgPool2d(1))
    return model


def _pytorchcv(module: str, name: str, size: int, **kwargs):
    def build():
        import importlib

        model = getattr(importlib.import_module(f"pytorchcv.models.{module}"), name)(pretrained=False, **kwargs)
        return _final_pool_adaptive(model), (torch.randn(1, 3, size, size),)
    build.__name__ = f"pcv_{name}"
    build.__doc__ = f"pytorchcv {name} (random weights, {size}×{size})."
    return _seeded(build, batch=2)


def _tv(build_model: Callable[[], nn.Module], name: str, size: int, doc: str):
    def build():
        return build_model(), (torch.randn(1, 3, size, size),)
    build.__name__, build.__doc__ = name, doc
    return _seeded(build, batch=2)


def _tvs():
    from graphopt import torchvision_style as tv

    return tv


tv_resnet18 = _tv(lambda: _tvs().resnet18(10, width=16), "tv_resnet18",
                  64, "torchvision ResNet-18 (BasicBlock, ReLU(inplace=True), out += identity), width 16, 64×64.")
tv_resnet50 = _tv(lambda: _tvs().resnet50(10, width=8), "tv_resnet50",
                  64, "torchvision ResNet-50 (Bottleneck), width 8, 64×64.")
tv_mobilenet_v2 = _tv(lambda: _tvs().MobileNetV2(10, width_mult=0.35), "tv_mobilenet_v2",
                      64, "torchvision MobileNetV2 (ReLU6 in place), width 0.35, 64×64.")
tv_mobilenet_v3_small = _tv(lambda: _tvs().mobilenet_v3_small(10, width_mult=0.5), "tv_mobilenet_v3_small", 64,
                            "torchvision MobileNetV3-small (Hardswish in place, SE scale * x, result += input, "
                            "Dropout(inplace=True)), width 0.5, 64×64.")
tv_efficientnet_b0 = _tv(lambda: _tvs().EfficientNet(width_mult=0.5, num_classes=10), "tv_efficientnet_b0", 64,
                         "torchvision EfficientNet-B0 blocks (SiLU in place, SE, stochastic depth, "
                         "Dropout(inplace=True)), width 0.5, 64×64.")
tv_shufflenet_v2 = _tv(lambda: _tvs().shufflenet_v2_x0_5(10), "tv_shufflenet_v2", 64,
                       "torchvision ShuffleNetV2 x0.5 (chunk, cat, channel shuffle), 64×64.")
tv_densenet = _tv(lambda: _tvs().DenseNet(8, (2, 3, 2), 16, 2, num_classes=10), "tv_densenet", 64,
                  "torchvision DenseNet blocks (concat → BatchNorm → ReLU(inplace=True) pre-activation), "
                  "growth 8, blocks (2, 3, 2), 64×64.")
tv_regnet_x_400mf = _tv(lambda: _tvs().regnet_x_400mf(10), "tv_regnet_x_400mf", 64,
                        "torchvision RegNetX-400MF (grouped bottlenecks, x + f(x), ReLU(inplace=True)), 64×64.")
tv_vgg11 = _tv(lambda: _tvs().vgg11(10, width_div=8, hidden=128), "tv_vgg11", 64,
               "torchvision VGG-11 (ReLU(inplace=True), AdaptiveAvgPool2d(7), dropout), widths / 8, 64×64.")
tv_squeezenet = _tv(lambda: _tvs().SqueezeNet(10), "tv_squeezenet", 64,
                    "torchvision SqueezeNet 1.1 (Fire: cat of expand branches, ceil-mode max pool), 64×64.")


@_seeded
def hf_convnext():
    """transformers ConvNextForImageClassification from a small config (random weights)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1], num_labels=10, image_size=64)
    return _Logits(ConvNextForImageClassification(cfg)), (torch.randn(1, 3, 64, 64),)


@_seeded
def hf_mobilevit():
    """transformers MobileViTForImageClassification, xx-small widths (random weights)."""
    from transformers import MobileViTConfig, MobileViTForImageClassification

    cfg = MobileViTConfig(image_size=64, hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 8, 16, 24, 32, 40, 160],
                          num_attention_heads=2, expand_ratio=2.0, num_labels=10)
    return _Logits(MobileViTForImageClassification(cfg)), (torch.randn(1, 3, 64, 64),)


@_seeded
def hf_vit():
    """transformers ViTForImageClassification, 2 layers × 32 hidden, 8×8 patches (random weights)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=10)
    return _Logits(ViTForImageClassification(cfg)), (torch.randn(1, 3, 32, 32),)


pcv_resnet10 = _pytorchcv("resnet", "resnet10", 64)
pcv_resnet20_cifar10 = _pytorchcv("resnet_cifar", "resnet20_cifar10", 32)
pcv_preresnet10 = _pytorchcv("preresnet", "preresnet10", 64)
pcv_mobilenetv2_wd4 = _pytorchcv("mobilenetv2", "mobilenetv2_wd4", 64)
pcv_mobilenetv3_small_w7d20 = _pytorchcv("mobilenetv3", "mobilenetv3_small_w7d20", 64)
pcv_efficientnet_b0 = _pytorchcv("efficientnet", "efficientnet_b0", 64)
pcv_shufflenetv2_wd2 = _pytorchcv("shufflenetv2", "shufflenetv2_wd2", 64)
pcv_squeezenet_v1_1 = _pytorchcv("squeezenet", "squeezenet_v1_1", 64)
pcv_densenet121 = _pytorchcv("densenet", "densenet121", 64)
pcv_ghostnet = _pytorchcv("ghostnet", "ghostnet", 64)
pcv_regnetx002 = _pytorchcv("regnet", "regnetx002", 64)


def _row(factory, source: tuple[str, tuple[str, ...]], macs: int, float_ops: int = 0,
         fails: frozenset[Check] = frozenset(), note: str = "", int8_macs: int | None = None) -> RealCodeEntry:
    return RealCodeEntry(factory.__name__, factory, source[0], macs, float_ops, fails, source[1], note, int8_macs)


_TV, _PCV, _HF = ("torchvision-style", ()), ("pytorchcv", ("pytorchcv",)), ("transformers", ("transformers",))
_AFFINE = ("standalone BatchNorms (after a concat) run as per-channel integer affines, whose C·H·W multiplies "
           "count as MACs (float BatchNorm counts none)")

# One row per model: factory, whose code, fp32 MACs after the passes, fp32 ops left between quantize and
# dequantize in the int8 graph (0 for every CNN: what is left is listed with its reason), checks that fail
# today, and the int8 graph's MACs where they differ from fp32's.
REAL_CODE: dict[str, RealCodeEntry] = {e.name: e for e in (
    _row(tv_resnet18, _TV, 11_060_480),
    _row(tv_resnet50, _TV, 6_269_440),
    _row(tv_mobilenet_v2, _TV, 4_747_968),
    _row(tv_mobilenet_v3_small, _TV, 1_754_816),
    _row(tv_efficientnet_b0, _TV, 9_899_904),
    _row(tv_shufflenet_v2, _TV, 3_230_848),
    _row(tv_densenet, _TV, 3_688_808, int8_macs=3_715_752, note=_AFFINE),
    _row(tv_regnet_x_400mf, _TV, 33_751_968),
    _row(tv_vgg11, _TV, 10_740_992, 1, note="AdaptiveAvgPool2d(7) of the 2×2 map a 64×64 input leaves has windows "
                                            "of 1 and 2 values (no one divisor); at 224×224 the map is 7×7 and "
                                            "the pool folds away"),
    _row(tv_squeezenet, _TV, 17_022_656),
    _row(pcv_resnet10, _PCV, 73_060_352),
    _row(pcv_resnet20_cifar10, _PCV, 40_813_184),
    _row(pcv_preresnet10, _PCV, 73_060_352, int8_macs=73_107_456, note=_AFFINE.replace("(after a concat)",
                                                                                      "(pre-activation)")),
    _row(pcv_mobilenetv2_wd4, _PCV, 3_663_744),
    _row(pcv_mobilenetv3_small_w7d20, _PCV, 2_999_648),
    _row(pcv_efficientnet_b0, _PCV, 33_246_592),
    _row(pcv_shufflenetv2_wd2, _PCV, 4_244_608),
    _row(pcv_squeezenet_v1_1, _PCV, 21_584_576),
    _row(pcv_densenet121, _PCV, 232_300_544, int8_macs=233_161_728, note=_AFFINE),
    _row(pcv_ghostnet, _PCV, 15_170_560),
    _row(pcv_regnetx002, _PCV, 16_586_112),
    _row(hf_resnet, _HF, 5_423_744),
    _row(hf_mobilenet_v2, _HF, 4_747_968),
    _row(hf_convnext, _HF, 2_634_112, 15, note="layer norm (10) and its channels-last layer scale (5) have no "
                                               "integer form"),
    _row(hf_mobilevit, _HF, 5_919_168, 30, note="layer norm (21) and softmax (9) have no integer form"),
    _row(hf_vit, _HF, 414_144, 8, note="layer norm (5) and attention (2) have no integer form; the "
                                       "position-embedding add is of a constant that is not per channel"),
    _row(hf_bert_tiny, _HF, 1_118_400, 7, note="layer norm (5) and attention (2) have no integer form"),
)}
