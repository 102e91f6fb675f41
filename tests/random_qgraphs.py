"""Seeded random small CNNs for the quantized numerics contract (`test_qcontract.py`).

`random_cnn(seed)` returns ``(model, x, description)``: a stem conv, 1–4 random blocks and a head,
3–48 channels, odd spatial sizes. Blocks: conv 1/3/5 (stride, padding, groups incl. depthwise and
channel multipliers) with optional BN and activation; residual adds (also in place, also with a
broadcast [N, C, 1, 1] operand); concats of two branches; max/avg pools; squeeze-excite
(``x * sigmoid(s)`` / ``x * hardsigmoid(s)``); pre-activation BatchNorm after a concat (DenseNet);
channel shuffle; standalone activations. Heads: global average pool or ``mean`` + linear, or a
final conv. Activations: ReLU, ReLU6, hardtanh, clamp, hardswish, hardsigmoid, SiLU, GELU,
sigmoid, tanh, leaky ReLU.
"""
from __future__ import annotations

import random

import torch
from torch import nn
from torch.nn import functional as F

ACTS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "hardtanh": lambda: nn.Hardtanh(-1.0, 1.0),
    "clamp": lambda: _Lambda(lambda x: torch.clamp(x, -0.5, 2.0)), "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid, "silu": nn.SiLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
}


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _act(name: str | None, inplace: bool) -> nn.Module:
    if name is None:
        return nn.Identity()
    if inplace and name in ("relu", "relu6", "hardtanh", "hardswish", "silu", "hardsigmoid", "leaky_relu"):
        m = ACTS[name]()
        m.inplace = True
        return m
    return ACTS[name]()


class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k, stride, padding, groups, bn, act, inplace):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = _act(act, inplace)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, body: nn.Module, act: str | None, inplace: bool, broadcast: bool):
        super().__init__()
        self.body, self.act, self.inplace, self.broadcast = body, _act(act, inplace), inplace, broadcast

    def forward(self, x):
        y = self.body(x)
        if self.broadcast:  # [N, C, H, W] + [N, C, 1, 1]
            x = x.mean((2, 3), keepdim=True)
        if self.inplace:
            y += x
            return self.act(y)
        return self.act(y + x)


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, preact_bn: int | None, act: str | None, inplace: bool):
        super().__init__()
        self.a, self.b = a, b
        self.bn = nn.BatchNorm2d(preact_bn) if preact_bn else None
        self.act = _act(act, inplace)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.act(self.bn(y)) if self.bn is not None else y


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int, gate: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.gate = nn.Sigmoid() if gate == "sigmoid" else nn.Hardsigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * s


class Shuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class Pool(nn.Module):
    def __init__(self, kind: str, k: int, stride: int, padding: int):
        super().__init__()
        self.kind, self.k, self.stride, self.padding = kind, k, stride, padding

    def forward(self, x):
        if self.kind == "max":
            return F.max_pool2d(x, self.k, self.stride, self.padding)
        return F.avg_pool2d(x, self.k, self.stride, self.padding)


class Head(nn.Module):
    def __init__(self, c: int, classes: int, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(c, classes) if kind != "conv" else nn.Conv2d(c, classes, 1)

    def forward(self, x):
        if self.kind == "pool":
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.kind == "mean":
            return self.fc(x.mean((2, 3)))
        return self.fc(x)


class RandomCNN(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def _conv_spec(rng: random.Random, cin: int, size: int, inplace: bool, act_ok=True, stride_ok=True):
    k = rng.choice([1, 3, 5] if size >= 5 else [1, 3])
    stride = rng.choice([1, 1, 2]) if stride_ok and size >= 6 else 1
    padding = rng.choice([0, k // 2, k // 2]) if size - k >= 2 else k // 2
    kind = rng.choice(["dense", "dense", "dense", "depthwise", "grouped", "multiplier"])
    if kind == "depthwise":
        groups, cout = cin, cin
    elif kind == "multiplier":
        groups, cout = cin, cin * rng.choice([2, 3])
        cout = cout if cout <= 48 else cin
    elif kind == "grouped" and cin % 2 == 0:
        groups = rng.choice([g for g in (2, 3, 4) if cin % g == 0])
        cout = groups * rng.randint(1, max(1, 24 // groups))
    else:
        groups, cout = 1, rng.randint(3, 48)
    cout = min(cout, 48) if groups == 1 else cout
    act = rng.choice([None, *ACTS]) if act_ok else None
    block = ConvBlock(cin, cout, k, stride, padding, groups, rng.random() < 0.6, act, inplace)
    return block, cout, (size + 2 * padding - k) // stride + 1, f"conv{k}x{k} s{stride} p{padding} g{groups} " \
                                                                  f"{cin}->{cout} {act or ''}"


def random_cnn(seed: int, inplace: bool | None = None) -> tuple[nn.Module, torch.Tensor, str]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    inplace = rng.random() < 0.5 if inplace is None else inplace
    cin, size = rng.choice([1, 3, 4]), rng.choice([5, 7, 9, 11, 13, 15, 17, 21, 30])
    in_size = size
    layers, parts = [], []
    stem, c, size, d = _conv_spec(rng, cin, size, inplace)
    layers.append(stem)
    parts.append(d)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["conv", "residual", "concat", "pool", "se", "dense_bn", "shuffle", "act"])
        if kind == "conv":
            block, c, size, d = _conv_spec(rng, c, size, inplace)
        elif kind == "residual":
            mid = rng.randint(3, 32)
            body = nn.Sequential(ConvBlock(c, mid, 1, 1, 0, 1, True, rng.choice(["relu", "relu6", None]), inplace),
                                 ConvBlock(mid, c, rng.choice([1, 3]), 1, 0, 1, True, None, inplace))
            body[1].conv.padding = (body[1].conv.kernel_size[0] // 2,) * 2
            broadcast = rng.random() < 0.25
            act = rng.choice(["relu", None])
            block, d = Residual(body, act, inplace, broadcast), f"residual[conv1x1 {c}->{mid}->{c}]" \
                                                                 f"{' broadcast' if broadcast else ''} {act or ''}"
        elif kind == "concat":
            a, ca, sa, da = _conv_spec(rng, c, size, inplace, stride_ok=False)
            b, cb, sb, db = _conv_spec(rng, c, size, inplace, stride_ok=False)
            if sa != sb:  # same spatial size: pad the 1×1 branch
                b = ConvBlock(c, cb, 1, 1, 0, 1, True, None, inplace)
                a = ConvBlock(c, ca, 1, 1, 0, 1, True, None, inplace)
                sa = size
                da, db = f"conv1x1 {c}->{ca}", f"conv1x1 {c}->{cb}"
            preact = rng.random() < 0.5
            act = rng.choice(["relu", "relu6", None])
            block = Concat(a, b, ca + cb if preact else None, act if preact else None, inplace)
            c, size, d = ca + cb, sa, f"cat[{da} | {db}]{' bn ' + (act or '') if preact else ''}"
        elif kind == "pool" and size >= 3:
            pk = rng.choice(["max", "avg"])
            k = rng.choice([2, 3])
            stride = rng.choice([1, 2])
            padding = rng.choice([0, 1]) if k == 3 else 0
            block, size, d = Pool(pk, k, stride, padding), (size + 2 * padding - k) // stride + 1, \
                f"{pk}pool{k} s{stride} p{padding}"
        elif kind == "se":
            gate = rng.choice(["sigmoid", "hardsigmoid"])
            block, d = SqueezeExcite(c, max(1, c // 4), gate), f"se({gate}) {c}"
        elif kind == "dense_bn":
            a = ConvBlock(c, rng.randint(3, 16), 1, 1, 0, 1, True, "relu", inplace)
            act = rng.choice(["relu", "relu6"])
            block = Concat(nn.Identity(), a, c + a.conv.out_channels, act, inplace)
            c, d = c + a.conv.out_channels, f"dense[cat(x, conv1x1) bn {act}]"
        elif kind == "shuffle" and c % 2 == 0:
            block, d = Shuffle(2), f"shuffle2 {c}"
        else:
            act = rng.choice(list(ACTS))
            block, d = _act(act, inplace), f"{act}"
        layers.append(block)
        parts.append(d)
    head = rng.choice(["pool", "mean", "conv"])
    layers.append(Head(c, rng.randint(2, 12), head))
    parts.append(f"head {head}")
    model = RandomCNN(layers)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # trained-looking BN statistics
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(-1.5, 1.5, generator=g)  # negative scales too
                m.bias.uniform_(-0.5, 0.5, generator=g)
                m.running_mean.normal_(0.0, 0.3, generator=g)
                m.running_var.uniform_(0.2, 2.0, generator=g)
    x = torch.randn(1, cin, in_size, in_size, generator=g)
    return model.eval(), x, " → ".join(parts) + f" on 1x{cin}x{in_size}x{in_size}"


def calibration(x: torch.Tensor, n: int = 3, batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *x.shape[1:], generator=g) for _ in range(n)]
