"""Seeded random CNNs written the way people write them, for the fuzz suite (tests/test_fuzz.py).

``case(seed)`` is a pure function of the seed: the block list (`Block`s), the `nn.Module` built from
it (nn.Sequential stems and heads, nested block classes, ``nn.ReLU(inplace=True)``, ``out += x``,
``torch.cat``, squeeze-excite, channel shuffles), its weights and BatchNorm statistics, the
example input (3–48 channels, odd and non-square sizes) and a pruning budget.
Blocks adapt to the channels and size they receive (groups that divide, strides the size allows), so
a `Case` with blocks removed (`Case.without`) is still a valid model: that is how
``python tests/fuzz_check.py PATH SEED`` reduces a failing seed to a minimal reproducer
(``python tests/fuzzgen.py SEED`` prints a case and its module).
"""
from __future__ import annotations

import dataclasses
import enum
import math
import random
import sys
from dataclasses import dataclass

import torch
from torch import nn

from graphopt.zoo import recalibrate_bn


class Act(str, enum.Enum):
    NONE = "none"
    RELU = "relu"
    RELU6 = "relu6"
    HARDSWISH = "hardswish"
    SILU = "silu"
    GELU = "gelu"


class Kind(str, enum.Enum):
    CONV = "conv"  # conv (+BN) (+act); k 1/3/5, stride, padding, groups
    DEPTHWISE = "depthwise"  # groups = in channels, channel multiplier up to 8 (at most 48 channels out)
    RESIDUAL = "residual"  # basic block: two convs, `out += shortcut(x)` or `out = out + ...`, optional projection
    INVERTED = "inverted"  # MobileNetV2: expand 1x1, depthwise, project 1x1, add when shapes allow
    CONCAT = "concat"  # parallel branches (optionally x itself) joined by torch.cat on channels
    SE = "se"  # squeeze-excite: global pool, 1x1 reduce, act, 1x1 expand, sigmoid/hardsigmoid, multiply
    SHUFFLE = "shuffle"  # ShuffleNet channel shuffle: view, transpose, contiguous, view
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"


class Head(str, enum.Enum):
    GAP_LINEAR = "gap_linear"  # nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear
    MEAN_LINEAR = "mean_linear"  # x.mean((2, 3)) then nn.Linear
    FLATTEN_LINEAR = "flatten_linear"  # torch.flatten(x, 1) then nn.Linear over C*H*W
    FEATURES = "features"  # the feature map itself is the output


@dataclass(frozen=True)
class Block:
    """One block; sizes are requests the builder adapts to what the block receives."""

    kind: Kind
    width: int = 8  # output channels (conv, residual projection), branch width (concat), hidden (inverted/se)
    k: int = 3
    stride: int = 1
    pad: int = 1  # conv padding, or pool padding (clipped to k // 2)
    groups: int = 1  # wished groups (conv), multiplier (depthwise), shuffle groups, branches (concat)
    bn: bool = True
    act: Act = Act.RELU
    inplace: bool = False
    flag: bool = False  # residual: `out += x`; concat: include x; pool: ceil_mode / count_include_pad=False

    def __str__(self) -> str:
        named = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)[1:])
        fields = (f"{name}={getattr(v, 'value', v)}" for name, v in named)
        return f"{self.kind.value}({', '.join(fields)})"


def _act(act: Act, inplace: bool) -> nn.Module:
    return {Act.NONE: nn.Identity, Act.RELU: lambda: nn.ReLU(inplace=inplace),
            Act.RELU6: lambda: nn.ReLU6(inplace=inplace), Act.HARDSWISH: lambda: nn.Hardswish(inplace=inplace),
            Act.SILU: lambda: nn.SiLU(inplace=inplace), Act.GELU: nn.GELU}[act]()


def _divisor(n: int, wish: int) -> int:
    """The largest divisor of ``n`` that is <= ``wish``."""
    return max(d for d in range(1, min(n, max(wish, 1)) + 1) if n % d == 0)


def _out_size(size: int, k: int, stride: int, pad: int, ceil: bool = False) -> int:
    span = size + 2 * pad - k
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class ConvBNAct(nn.Sequential):
    """conv (+BN) (+act), the torchvision Conv2dNormActivation way."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, pad: int | None = None, groups: int = 1,
                 bn: bool = True, act: Act = Act.RELU, inplace: bool = False):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2 if pad is None else pad, groups=groups, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        if act is not Act.NONE:
            layers.append(_act(act, inplace))
        super().__init__(*layers)


class Residual(nn.Module):
    def __init__(self, cin: int, b: Block):
        super().__init__()
        cout = cin if b.width % 2 else b.width  # odd widths keep the channels (identity shortcut at stride 1)
        self.body = nn.Sequential(ConvBNAct(cin, cout, b.k, b.stride, act=b.act, inplace=b.inplace),
                                  ConvBNAct(cout, cout, b.k, act=Act.NONE, bn=b.bn))
        self.shortcut = (nn.Identity() if cout == cin and b.stride == 1
                         else ConvBNAct(cin, cout, 1, b.stride, act=Act.NONE, bn=b.bn))
        self.act = _act(b.act, b.inplace)
        self.in_place_add = b.flag
        self.out_channels = cout

    def forward(self, x):
        out = self.body(x)
        if self.in_place_add:
            out += self.shortcut(x)
        else:
            out = out + self.shortcut(x)
        return self.act(out)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, b: Block, cout: int):
        super().__init__()
        hidden = max(b.width, 2)
        self.use_res = b.stride == 1 and cin == cout
        self.conv = nn.Sequential(ConvBNAct(cin, hidden, 1, act=b.act, inplace=b.inplace),
                                  ConvBNAct(hidden, hidden, b.k, b.stride, groups=hidden, act=b.act, inplace=b.inplace),
                                  nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class Concat(nn.Module):
    def __init__(self, cin: int, b: Block):
        super().__init__()
        ks = [1, 3, 5][:max(1, min(b.groups, 3))]
        widths = [max(2, b.width // len(ks)) + i for i in range(len(ks))]
        self.branches = nn.ModuleList(ConvBNAct(cin, w, k, act=b.act, inplace=b.inplace, bn=b.bn)
                                      for w, k in zip(widths, ks, strict=False))
        self.keep_input = b.flag
        self.out_channels = cin * b.flag + sum(widths)

    def forward(self, x):
        return torch.cat(([x] if self.keep_input else []) + [m(x) for m in self.branches], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, cin: int, b: Block):
        super().__init__()
        squeeze = max(1, cin // max(b.groups, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act = nn.Conv2d(cin, squeeze, 1), _act(b.act if b.act is not Act.NONE else Act.RELU, b.inplace)
        self.fc2 = nn.Conv2d(squeeze, cin, 1)
        self.gate = nn.Hardsigmoid() if b.flag else nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.view(b, self.groups, c // self.groups, h, w)
        return x.transpose(1, 2).contiguous().view(b, c, h, w)


class FuzzNet(nn.Module):
    """features (nn.Sequential of blocks) → head (nn.Sequential, nn.Linear or nothing)."""

    def __init__(self, cin: int, size: tuple[int, int], blocks: tuple[Block, ...], head: Head, classes: int):
        super().__init__()
        self.head_kind = head
        c, (h, w) = cin, size
        layers = []
        for b in blocks:
            m, c, h, w = _build(b, c, h, w)
            layers.append(m)
        self.features = nn.Sequential(*layers)
        if head is Head.GAP_LINEAR:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))
        elif head is Head.MEAN_LINEAR:
            self.head = nn.Linear(c, classes)
        elif head is Head.FLATTEN_LINEAR:
            self.head = nn.Linear(c * h * w, classes)
        self.out_shape = (classes,) if head is not Head.FEATURES else (c, h, w)

    def forward(self, x):
        x = self.features(x)
        if self.head_kind is Head.MEAN_LINEAR:
            return self.head(x.mean((2, 3)))
        if self.head_kind is Head.FLATTEN_LINEAR:
            return self.head(torch.flatten(x, 1))
        return self.head(x) if self.head_kind is Head.GAP_LINEAR else x


def _fit(size: int, k: int, stride: int, pad: int) -> tuple[int, int]:
    """(stride, pad) so that a k-window fits: padding grows or the stride drops on tiny maps."""
    pad = min(pad, k // 2)
    while size + 2 * pad < k:
        pad += 1
    if _out_size(size, k, stride, pad) < 1 or size < 3:
        stride = 1
    return stride, pad


def _build(b: Block, c: int, h: int, w: int) -> tuple[nn.Module, int, int, int]:
    """The block's module for input (c, h, w), and its output (c, h, w)."""
    k = min(b.k, 2 * min(h, w) + 1)
    k = k if k % 2 else k - 1
    stride, pad = _fit(min(h, w), k, b.stride, b.pad)
    if b.kind is Kind.CONV:
        g = _divisor(math.gcd(c, b.width), b.groups)
        m = ConvBNAct(c, b.width, k, stride, pad, g, b.bn, b.act, b.inplace)
        return m, b.width, _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
    if b.kind is Kind.DEPTHWISE:
        cout = c * max(1, min(b.groups, 48 // c))
        m = ConvBNAct(c, cout, k, stride, pad, c, b.bn, b.act, b.inplace)
        return m, cout, _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
    if b.kind is Kind.RESIDUAL:
        m = Residual(c, dataclasses.replace(b, k=k, stride=stride))
        return m, m.out_channels, _out_size(h, k, stride, k // 2), _out_size(w, k, stride, k // 2)
    if b.kind is Kind.INVERTED:
        cout = c if b.flag else b.width // 2 + 2
        m = InvertedResidual(c, dataclasses.replace(b, k=k, stride=stride), cout)
        return m, cout, _out_size(h, k, stride, k // 2), _out_size(w, k, stride, k // 2)
    if b.kind is Kind.CONCAT:
        m = Concat(c, dataclasses.replace(b, groups=b.groups if min(h, w) >= 2 else 1))
        return m, m.out_channels, h, w
    if b.kind is Kind.SE:
        return SqueezeExcite(c, b), c, h, w
    if b.kind is Kind.SHUFFLE:
        return ChannelShuffle(_divisor(c, b.groups) if c > 1 else 1), c, h, w
    k = min(b.k, min(h, w))
    pad = min(b.pad, k // 2)
    ceil = b.flag and b.kind is Kind.MAXPOOL
    stride = b.stride if _out_size(min(h, w), k, b.stride, pad, ceil) >= 1 else 1
    if b.kind is Kind.MAXPOOL:
        m = nn.MaxPool2d(k, stride, pad, ceil_mode=ceil)
    else:
        m = nn.AvgPool2d(k, stride, pad, count_include_pad=not b.flag)
    return m, c, _out_size(h, k, stride, pad, ceil), _out_size(w, k, stride, pad, ceil)


def random_block(r: random.Random) -> Block:
    kind = r.choices(list(Kind), weights=[5, 2, 3, 2, 2, 1, 1, 1, 1])[0]
    act = r.choice(list(Act))
    return Block(kind=kind, width=r.randint(3, 48), k=r.choice([1, 3, 3, 5]), stride=r.choice([1, 1, 2]),
                 pad=r.choice([0, 1, 2]), groups=r.choice([1, 1, 2, 3, 4, 8]), bn=r.random() < 0.7, act=act,
                 inplace=act in (Act.RELU, Act.RELU6, Act.HARDSWISH, Act.SILU) and r.random() < 0.5,
                 flag=r.random() < 0.5)


@dataclass(frozen=True)
class Case:
    """One random graph and what the three fuzz paths do with it."""

    seed: int
    cin: int
    size: tuple[int, int]
    blocks: tuple[Block, ...]
    head: Head
    classes: int
    target_macs: float  # prune path budget
    channel_multiple: int
    criterion: str
    rng: int | None = None  # seeds weights and inputs; None: ``seed`` (a hand-kept case can keep its old numbers)

    def model(self) -> FuzzNet:
        """The float model: seeded weights, BatchNorm statistics from train-mode passes, eval mode."""
        with torch.random.fork_rng():
            torch.manual_seed(self._rng)
            net = FuzzNet(self.cin, self.size, self.blocks, self.head, self.classes)
        return recalibrate_bn(net, (self.inputs(4, 0),), seed=self._rng)

    def inputs(self, batch: int = 1, which: int = 1) -> torch.Tensor:
        """Input number ``which`` (0: BN statistics, 1: the example, 2..: more checks)."""
        g = torch.Generator().manual_seed(self._rng * 1000 + which)
        return torch.randn(batch, self.cin, *self.size, generator=g)

    @property
    def _rng(self) -> int:
        return self.seed if self.rng is None else self.rng

    def without(self, index: int) -> Case:
        return dataclasses.replace(self, blocks=self.blocks[:index] + self.blocks[index + 1:])

    def __str__(self) -> str:
        blocks = "\n  ".join(map(str, self.blocks))
        return (f"seed {self.seed}: input 1x{self.cin}x{self.size[0]}x{self.size[1]}, head {self.head.value} "
                f"({self.classes}), prune target_macs={self.target_macs} channel_multiple={self.channel_multiple} "
                f"{self.criterion}\n  {blocks}")


def case(seed: int) -> Case:
    r = random.Random(seed)
    blocks = tuple(random_block(r) for _ in range(r.randint(1, 3)))
    size = (r.choice([5, 7, 9, 11, 13, 15]), r.choice([5, 7, 9, 11, 13, 15, 8]))
    return Case(seed, r.randint(3, 16), size, blocks, r.choice(list(Head)), r.randint(1, 12),
                round(r.uniform(0.3, 0.8), 2), r.choice([1, 1, 2, 4]), r.choice(["l1", "l2"]))


if __name__ == "__main__":
    for s in sys.argv[1:]:
        c = case(int(s))
        print(c)
        print(c.model())
