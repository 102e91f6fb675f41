"""lower() / export_library(): numerics of the scheduled host code against PyTorch, stats, errors,
and an aarch64 cross-compiled export."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from graphopt.errors import LoweringError  # noqa: E402
from graphopt.targets import get_target  # noqa: E402
from graphopt.targets.lowering.phases import LoweringResult, export_library, lower  # noqa: E402


def _run(result: LoweringResult, *inputs: torch.Tensor) -> list[np.ndarray]:
    vm = relax.VirtualMachine(result.executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    return [o.numpy() for o in out]  # main returns a tuple, even for one output


def _check(model: nn.Module, *inputs: torch.Tensor) -> LoweringResult:
    model = model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    result = lower(torch.export.export(model, inputs), get_target("host"))
    (out,) = _run(result, *inputs)
    assert out.shape == tuple(ref.shape)
    scale = max(1.0, float(ref.abs().max()))
    err = float(np.abs(out - ref.numpy()).max())
    assert err <= 1e-4 * scale, f"max abs err {err:.2e} (output scale {scale:.2e})"
    return result


class Act(nn.Module):
    def __init__(self, conv: nn.Module, act=torch.relu):
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x):
        return self.act(self.conv(x))


@pytest.mark.parametrize("cin,cout,k,stride,pad,groups,dilation,hw", [
    (16, 32, 3, 1, 1, 1, 1, 14),  # regular 3x3
    (8, 24, 3, 2, 1, 1, 1, 15),  # strided, odd size, channels not a lane multiple
    (3, 16, 7, 2, 3, 1, 1, 32),  # stem-like
    (3, 32, 3, 2, 1, 1, 1, 31),  # MobileNetV2's stem (a 27-term sum) at an odd size
    (16, 96, 1, 1, 0, 1, 1, 17),  # a 16-term 1×1 expand
    (32, 32, 3, 1, 1, 32, 1, 12),  # depthwise
    (24, 24, 3, 2, 1, 24, 1, 13),  # depthwise strided
    (16, 32, 3, 1, 1, 4, 1, 10),  # grouped
    (16, 16, 3, 1, (2, 0), 1, 1, 9),  # asymmetric padding
    (8, 16, 3, 1, 2, 1, 2, 11),  # dilated
    (64, 40, 1, 1, 0, 1, 1, 7),  # pointwise
])
def test_conv2d(cin, cout, k, stride, pad, groups, dilation, hw):
    conv = nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups)
    result = _check(Act(conv), torch.randn(1, cin, hw, hw))
    assert result.stats["scheduled"].get("channel_last_reduction", 0) >= 1


def test_conv2d_relu6_batch2_no_bias():
    _check(Act(nn.Conv2d(8, 16, 3, 1, 1, bias=False), F.relu6), torch.randn(2, 8, 10, 10))


class PadBetweenConvs(nn.Module):
    """conv → ReLU6 → F.pad (asymmetric, as HF MobileNetV2's "same" padding) → depthwise stride 2."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, stride=2, groups=16)

    def forward(self, x):
        return self.b(F.pad(F.relu6(self.a(x)), (0, 1, 0, 1)))


def test_pad_between_channel_last_convs_runs_channel_last_and_fused_pads_are_written_whole():
    """Layout conversion leaves a pad in NCHW between two transposes (relax has no layout rule for
    it); the lowering moves it channel-last. Fused into the conv's epilogue, the pad's border (no
    conv tile produces it) must still be written."""
    from graphopt.targets.lowering.phases import run_phases

    x = torch.randn(1, 8, 16, 16)
    result = _check(PadBetweenConvs(), x)
    ep = torch.export.export(PadBetweenConvs().eval(), (x,)).run_decompositions()
    state: dict = {}
    mod = run_phases(ep, get_target("host"), state, {}, until="layout")
    assert str(mod["main"]).count("R.permute_dims(") == 2  # the graph input's and output's only
    assert result.stats["layout"] == "channel-last"
    assert result.stats["scheduled"].get("channel_last_reduction", 0) == 2  # the pad in a conv's epilogue


@pytest.mark.parametrize("shape,out", [((1, 100), 37), ((4, 64), 128), ((2, 5, 48), 20)])
def test_dense(shape, out):
    _check(nn.Linear(shape[-1], out), torch.randn(*shape))


class Pools(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(4, 16, 3, padding=1), pool

    def forward(self, x):
        return self.pool(self.conv(x))


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1),
                                  nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(3)],
                         ids=["max3s2", "max2", "avg3", "adaptive1", "adaptive3"])
def test_pooling(pool):
    _check(Pools(pool), torch.randn(1, 4, 18, 18))


class Residual(nn.Module):
    """A ResNet basic block with an unfolded BatchNorm (lowering must decompose it for inference)."""

    def __init__(self, c=16):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        for bn in (self.b1, self.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def test_residual_block_with_batchnorm():
    _check(Residual(), torch.randn(1, 16, 12, 12))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(48)

    def forward(self, x):
        return torch.softmax(self.ln(x) * 3.0, dim=-1)


def test_layernorm_softmax():
    _check(Norms(), torch.randn(2, 7, 48))


def test_stats_are_json_and_complete():
    result = _check(Act(nn.Conv2d(4, 8, 3, padding=1)), torch.randn(1, 4, 8, 8))
    stats = json.loads(json.dumps(result.stats))
    assert list(stats["phases"]) == ["import", "decompose", "layout", "legalize", "fuse", "schedule", "build"]
    assert stats["kernels"] == sum(stats["scheduled"].values()) + len(stats["unscheduled"])
    assert stats["unscheduled"] == []
    assert isinstance(result.ir_module, tvm.IRModule)


def test_host_export_loads_and_runs(tmp_path):
    model, x = Act(nn.Conv2d(4, 8, 3, padding=1)).eval(), torch.randn(1, 4, 8, 8)
    spec = get_target("host")
    path = export_library(lower(torch.export.export(model, (x,)), spec), spec, tmp_path / "m.so")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-4)


class Unfold(nn.Module):
    def forward(self, x):
        return F.unfold(x, 2)


def test_tvm_failure_becomes_lowering_error():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(LoweringError) as info:
        lower(torch.export.export(Unfold(), (x,)), get_target("host"))
    assert info.value.items and "import" in info.value.items[0].where
    assert "Traceback" not in str(info.value)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="no aarch64 cross compiler")
def test_aarch64_export(tmp_path):
    spec = get_target("arm-a72")
    model, x = Residual(8).eval(), torch.randn(1, 8, 10, 10)
    result = lower(torch.export.export(model, (x,)), spec)
    assert result.stats["unscheduled"] == []
    path = export_library(result, spec, tmp_path / "m.so")
    kind = subprocess.run(["file", "-b", str(path)], capture_output=True, text=True, check=True).stdout
    assert "ARM aarch64" in kind and "shared object" in kind


def _te_matmul_flipped():
    te = tvm.te
    a, b = te.placeholder((16, 32), name="a"), te.placeholder((32, 48), name="b")
    k = te.reduce_axis((0, 32), "k")
    c = te.compute((16, 48), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    t = te.compute((16, 48), lambda i, j: c[i, j] - c[15 - i, 47 - j], name="t")  # needs other tiles
    return te.create_prim_func([a, b, t]), [(16, 32), (32, 48)], (16, 48), \
        lambda x, y: x @ y - (x @ y)[::-1, ::-1]


def _te_two_reductions():
    te = tvm.te
    a = te.placeholder((16, 32), name="a")
    k, i = te.reduce_axis((0, 32), "k"), te.reduce_axis((0, 16), "i")
    r = te.compute((16,), lambda x: te.sum(a[x, k], axis=k), name="r")
    c = te.compute((32,), lambda y: te.sum(a[i, y] * r[i], axis=i), name="c")
    return te.create_prim_func([a, c]), [(16, 32)], (32,), lambda x: (x * x.sum(1, keepdims=True)).sum(0)


@pytest.mark.parametrize("make,rule", [(_te_matmul_flipped, "channel_last_reduction"),
                                       (_te_two_reductions, "fallback")])
def test_schedule_rules_on_primfuncs(make, rule):
    from graphopt.targets.lowering.schedules import schedule_module

    func, in_shapes, out_shape, ref = make()
    spec = get_target("host")
    mod, counts, unscheduled = schedule_module(tvm.IRModule({"main": func}), spec)
    assert counts == {rule: 1} and unscheduled == []
    rng = np.random.default_rng(0)
    args = [rng.random(s, dtype=np.float32) for s in in_shapes]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    tvm.compile(mod, target=spec.tvm()).mod["main"](*[tvm.runtime.tensor(a) for a in args], out)
    np.testing.assert_allclose(out.numpy(), ref(*args), rtol=1e-5, atol=1e-5)


# ---- edge sizes: reductions of length 1 (issue 15) and other degenerate shapes


def _eager64(model: nn.Module, x: torch.Tensor):
    """The model's output computed in float64 (the oracle the fp32 kernels are held to)."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def _assert_close(got, want, what: str = "") -> None:
    """fp32 against float64 eager: max abs error ≤ 1e-4 of the output's magnitude."""
    want = want.numpy() if isinstance(want, torch.Tensor) else want
    err, scale = float(np.abs(np.asarray(got, np.float64) - want).max()), max(1e-3, float(np.abs(want).max()))
    assert err <= 1e-4 * scale, f"{what}: max abs err {err:.2e}, {err / scale:.1%} of the output scale {scale:.2e}"


def _plus_half(y):
    return torch.relu(y) + 0.5  # an epilogue fused into the reduction's kernel


@pytest.mark.parametrize("layer,shape", [
    (lambda: nn.Linear(1, 13), (1, 1)),  # reduction 1
    (lambda: nn.Linear(1, 13), (3, 1)),
    (lambda: nn.Linear(13, 1), (2, 13)),  # one output
    (lambda: nn.Linear(1, 1), (1, 1)),
    (lambda: nn.Conv2d(8, 16, 1, groups=8), (1, 8, 5, 5)),  # one input channel per group: reduction 1
    (lambda: nn.Conv2d(1, 9, 1), (1, 1, 5, 3)),  # one input channel: reduction 1
    (lambda: nn.Conv2d(4, 4, 1, groups=4), (1, 4, 6, 6)),  # depthwise 1×1
    (lambda: nn.Conv2d(4, 12, 1, groups=4), (1, 4, 6, 6)),  # depthwise 1×1, channel multiplier 3
    (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4), (1, 4, 6, 6)),  # depthwise 3×3, multiplier 2
    (lambda: nn.Conv2d(1, 1, 1), (1, 1, 1, 1)),  # one channel, one pixel, reduction 1
    (lambda: nn.Conv2d(1, 1, 3, padding=1), (1, 1, 1, 1)),  # kernel larger than the (unpadded) input
    (lambda: nn.Conv2d(3, 4, 5, padding=2), (1, 3, 2, 2)),
    (lambda: nn.Conv2d(4, 6, 1, stride=3), (1, 4, 7, 7)),  # stride larger than the kernel
    (lambda: nn.Conv2d(4, 6, 2, stride=3), (1, 4, 7, 7)),
    (lambda: nn.Conv2d(8, 7, 1), (2, 8, 1, 1)),  # 1×1 maps
    (lambda: nn.AvgPool2d(1), (1, 3, 4, 4)),  # pooling windows of one pixel
    (lambda: nn.AvgPool2d(1, 2), (1, 3, 5, 5)),
    (lambda: nn.MaxPool2d(1, 2), (1, 3, 4, 4)),
    (lambda: nn.AdaptiveAvgPool2d(1), (1, 3, 1, 1)),
], ids=["linear1x13", "linear1x13_batch3", "linear13x1", "linear1x1", "grouped1x1_1per_group", "conv1to9",
        "dw1x1", "dw1x1_mult3", "dw3x3_mult2", "conv1ch_1px", "k3_on_1px", "k5_on_2px", "k1_stride3", "k2_stride3",
        "map1x1", "avgpool1", "avgpool1_s2", "maxpool1_s2", "global_pool_1px"])
def test_edge_sizes(layer, shape):
    """Each compiled to its float64 eager output. A reduction of length 1 used to come out 30–130 %
    off: the fused epilogue was applied twice (e.g. the bias added twice)."""
    model, x = Act(layer(), _plus_half).eval(), torch.randn(*shape)
    (out,) = _run(lower(torch.export.export(model, (x,)), get_target("host")), x)
    _assert_close(out, _eager64(model, x), str(model.conv))


def test_unit_reductions_become_spatial_blocks():
    """A reduction whose axes all have extent 1 is rewritten as one spatial block (no init, no
    accumulation): scheduled with its epilogue inlined, it computes x·w + b, not x·w + 2b. A tuple
    reduction (argmax) over one element too; a reduction of length 2 stays a reduction."""
    from graphopt.targets.lowering.schedules import schedule_module, spatialize_unit_reductions

    te, topi = tvm.te, tvm.topi
    a, w, b = te.placeholder((4, 1), name="a"), te.placeholder((1, 12), name="w"), te.placeholder((12,), name="b")
    k, k2 = te.reduce_axis((0, 1), "k"), te.reduce_axis((0, 2), "k2")
    c = te.compute((4, 12), lambda i, j: te.sum(a[i, k] * w[k, j], axis=k), name="c")
    t = te.compute((4, 12), lambda i, j: c[i, j] + b[j], name="t")
    arg = topi.argmax(a, axis=1)
    mod = spatialize_unit_reductions(tvm.IRModule({"main": te.create_prim_func([a, w, b, t, arg])}))
    assert "T.init()" not in mod.script() and '"R"' not in mod.script()
    mod, counts, _ = schedule_module(mod, get_target("host"))
    args = [np.random.default_rng(0).random(s, dtype=np.float32) for s in ((4, 1), (1, 12), (12,))]
    out, index = tvm.runtime.tensor(np.zeros((4, 12), np.float32)), tvm.runtime.tensor(np.ones(4, np.int32))
    tvm.compile(mod, target=get_target("host").tvm()).mod["main"](*[tvm.runtime.tensor(v) for v in args], out, index)
    np.testing.assert_allclose(out.numpy(), args[0].astype(np.float64) @ args[1] + args[2], rtol=1e-6)
    assert not index.numpy().any()

    longer = te.compute((4, 12), lambda i, j: te.sum(a[i, k2 // 2] * w[k2 // 2, j], axis=k2), name="c")
    kept = tvm.IRModule({"main": te.create_prim_func([a, w, longer])})
    assert "T.init()" in spatialize_unit_reductions(kept).script()  # a reduction of length 2 stays one


def test_injective_chains_do_not_copy_copies():
    """Three chained ops each reading its input three times (as a requantize reads its fixed-point
    term): inlined whole, the last expression holds 27 copies of the first (TVM's simplifier then ran
    for over 15 minutes on an int8 concat of concats); the Injective rule keeps a copied expression
    from being copied again, and computes the kept block a row at a time under its consumer."""
    from graphopt.targets.lowering.schedules import schedule_module

    te = tvm.te
    x = te.placeholder((4, 16), name="x")

    def level(v, n):
        h = te.compute((4, 16), lambda i, j: v[i, j] * 3.0 + 1.0, name=f"h{n}")
        return te.compute((4, 16), lambda i, j: h[i, j] + h[i, j] * h[i, j], name=f"y{n}")

    y = level(level(level(x, 0), 1), 2)
    mod, counts, _ = schedule_module(tvm.IRModule({"main": te.create_prim_func([x, y])}), get_target("host"))
    assert counts == {"injective": 1}
    assert 1 < mod.script().count("T.sblock(") and mod.script().count("x[") <= 9

    def ref(v):
        for _ in range(3):
            v = v * 3.0 + 1.0
            v = v + v * v
        return v

    arg = np.random.default_rng(0).random((4, 16), dtype=np.float32) * 0.1
    out = tvm.runtime.tensor(np.zeros((4, 16), np.float32))
    tvm.compile(mod, target=get_target("host").tvm()).mod["main"](tvm.runtime.tensor(arg), out)
    np.testing.assert_allclose(out.numpy(), ref(arg.astype(np.float64)), rtol=1e-5)


@pytest.mark.parametrize("target", ["host", pytest.param("arm", marks=pytest.mark.emulation),
                                    pytest.param("armv7", marks=pytest.mark.slow),
                                    pytest.param("cortex-m4", marks=pytest.mark.emulation)])
def test_edge_sizes_on_every_target(target):
    """`EdgeSizes` (every edge case in one model: one compile per target) against float64 eager."""
    from conftest import require_tools
    from edge_models import TOOLS, EdgeSizes, edge_input

    import graphopt

    require_tools(*TOOLS.get(target, ()))
    model, x = EdgeSizes().eval(), edge_input()
    options = {} if target == "host" else {"count_instructions": False}
    cm = graphopt.compile(model, (x,), target, progress=False, **options)
    for inp in (x, edge_input(1, 3.0)):
        for i, (got, want) in enumerate(zip(cm(inp), _eager64(model, inp), strict=True)):
            _assert_close(got, want, f"{target} output {i}")


@pytest.mark.parametrize("seed", [0, 1] + [pytest.param(s, marks=pytest.mark.slow) for s in range(2, 12)])
def test_tiny_random_layers(seed):
    """Random convs and Linears on 1–3 channels and 1–3 pixel maps (`edge_models.tiny_layers`), all in
    one model, against float64 eager."""
    from edge_models import TINY_SHAPE, tiny_layers

    model = tiny_layers(seed)
    x = torch.randn(*TINY_SHAPE, generator=torch.Generator().manual_seed(seed))
    outs = _run(lower(torch.export.export(model, (x,)), get_target("host")), x)
    for name, got, want in zip(model.names, outs, _eager64(model, x), strict=True):
        _assert_close(got, want, name)


def test_narrow_vector_spec_numerics():
    """The same rules with 128-bit vectors and 16 registers (NEON/AVX2-like tiles), run on the host."""
    import dataclasses

    spec = dataclasses.replace(get_target("host"), name="host-128", vector_bits=128, features=frozenset(),
                               aliases=())
    model = nn.Sequential(Residual(8), nn.Conv2d(8, 24, 3, 2, 1, groups=8), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(24, 10)).eval()
    x = torch.randn(1, 8, 12, 12)
    (out,) = _run(lower(torch.export.export(model, (x,)), spec), x)
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-4)


# ---- MobileNetV2's inverted residual blocks (issue 17: fp32 depthwise and 1×1 convs on the host)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand + BN + ReLU6, depthwise 3×3 (stride 1 or 2) + BN + ReLU6, 1×1
    project + BN, plus the input when the shapes allow; BatchNorm statistics randomized."""

    def __init__(self, cin: int, expand: int, cout: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.layers = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout
        for bn in self.layers:
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


@pytest.mark.parametrize("cin,expand,cout,stride,hw", [
    (24, 6, 24, 1, 29),  # MobileNetV2's 144-channel block at an odd size (9 vectors of 16 channels)
    (16, 6, 24, 2, 23),  # 96 channels, stride 2, odd size
    (6, 6, 6, 1, 15),  # 36 channels: not a multiple of 16 (nor of 8)
    (5, 6, 7, 2, 17),  # 30 channels, stride 2
    (32, 1, 16, 1, 18),  # 32 channels: two vectors per tile
    (8, 3, 8, 2, 9),  # 24 channels, a 5×5 output
])
def test_inverted_residual_blocks_match_float64(cin, expand, cout, stride, hw):
    """Each block compiled once for the host and run on three inputs against its float64 eager output
    (the depthwise and 1×1 kernels' register tiles, their fused bias + ReLU6 and residual add)."""
    torch.manual_seed(cin * 100 + hw)
    model = InvertedResidual(cin, expand, cout, stride).eval()
    x = torch.randn(1, cin, hw, hw)
    result = lower(torch.export.export(model, (x,)), get_target("host"))
    assert result.stats["unscheduled"] == []
    for inp in (x, torch.randn(1, cin, hw, hw) * 3.0, torch.rand(1, cin, hw, hw) - 0.9):
        (out,) = _run(result, inp)
        _assert_close(out, _eager64(model, inp), f"block {cin}->{cin * expand}->{cout} stride {stride} at {hw}")


def test_register_tiles_stay_off_the_heap_with_avx512():
    """With 32 vector registers of 16 lanes, a 28-pixel × 16-channel accumulator tile (1,792 B) was more
    than TVM puts on the stack (1 KiB): each tile went through `TVMBackendAllocWorkspace`, was zeroed by a
    memset and spilled (MobileNetV2's depthwise 3×3 over 144 channels at 56×56: 334 → 100 µs alone once its
    tile fits, 2 threads); so did a tile of exactly 1 KiB (8 px × 32 channels: TVM's bound is strict). The
    depthwise and 1×1 kernels of 144- and 96-channel blocks for an AVX-512 CPU compile without any workspace
    allocation."""
    import dataclasses

    from graphopt.targets.lowering.phases import run_phases
    from graphopt.targets.spec import Feature

    host = get_target("host")
    spec = dataclasses.replace(host, name="avx512", vector_bits=512, num_cores=2, aliases=(),
                               features=frozenset({Feature.AVX2, Feature.FMA, Feature.AVX512}),
                               tvm_target={"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    convs = []
    for cin, size in ((24, 28), (16, 32)):  # 144 channels (one vector per tile), 96 (two: 8 px × 32 ch = 1 KiB)
        model, x = InvertedResidual(cin, 6, 24, 1).eval(), torch.randn(1, cin, size, size)
        mod = run_phases(torch.export.export(model, (x,)), spec, {}, {}, until="schedule")
        convs += [(gv.name_hint, f) for gv, f in mod.functions_items()
                  if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint]
    assert len(convs) == 6
    for name, func in convs:
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=spec.tvm())
        asm = (lib.mod.imports[0] if lib.mod.imports else lib.mod).inspect_source("asm")
        assert "vfmadd" in asm and "TVMBackendAllocWorkspace" not in asm, name


def test_small_fp32_weights_keep_each_pixels_channels_on_one_core():
    """MobileNetV2's 144→24 1×1 project (13.8 KB of fp32 weights, 24 channels = three 8-lane tiles of 32 B,
    28-pixel tiles): channel tiles outermost split the channel tiles of the same pixels between the two cores,
    which wrote neighbouring bytes of shared cache lines (0.92× alone with pixel tiles outermost, 2 threads). With a
    known L1 holding twice the weights the parallel loop runs over pixel tiles only; without one (the ARM
    targets) the channel tiles stay outermost."""
    import dataclasses

    from graphopt.targets.lowering.phases import run_phases
    from graphopt.targets.lowering.schedules import ChannelLastReduction, CpuParams

    x = torch.randn(1, 144, 56, 56)
    fused = run_phases(torch.export.export(nn.Conv2d(144, 24, 1).eval(), (x,)), get_target("host"), {}, {},
                       until="fuse")
    (func,) = [f for gv, f in fused.functions_items() if "conv2d" in gv.name_hint]
    params = CpuParams(lanes=16, vector_regs=32, cores=2, l1d_bytes=32 << 10)

    def parallel_extent(p):
        import tvm_ffi

        sch = ChannelLastReduction(p).apply(func, get_target("host").tvm(), False)
        loops: list = []
        tvm_ffi.structural_walk(sch.mod["main"].body, (tvm.tirx.For, lambda n: loops.append(n)
                                                       if n.kind == tvm.tirx.ForKind.PARALLEL else None))
        (loop,) = loops
        return int(loop.extent)

    assert parallel_extent(params) == 56 * 2  # rows × 28-pixel tiles: a tile's 24 channels on one core
    assert parallel_extent(dataclasses.replace(params, l1d_bytes=None)) == 3 * 56  # channel tiles × rows


def test_depthwise_taps_unrolled_on_x86_only():
    """All nine taps of a depthwise 3×3 are unrolled on x86 (MobileNetV2's fp32 depthwise convs 0.86–0.98×
    alone), and short sums (≤ 32 terms) take one-vector channel tiles on AVX-512; the ARM and Cortex-M
    schedules keep their tap loop and tiles (not measured there; flash on the M4)."""
    from graphopt.targets.lowering.schedules import CpuParams
    from graphopt.targets.spec import Feature

    host = get_target("host")
    assert CpuParams.from_spec(host).unroll_windows == (host.has(Feature.AVX2) or host.has(Feature.AVX512))
    assert CpuParams.from_spec(host).one_vector_short_sums == host.has(Feature.AVX512)
    for name in ("arm-a72", "arm-a55", "cortex-m4"):
        params = CpuParams.from_spec(get_target(name))
        assert not params.unroll_windows and not params.one_vector_short_sums, name
