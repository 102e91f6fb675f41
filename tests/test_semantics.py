"""Rewrites never change semantics: copies a later view needs (channel shuffle, attention heads),
graphs with nested submodules (no_grad / autocast regions, torch.cond), and a pass that breaks a
graph is a graphopt error naming the user's line — float64 oracles and compiled checks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.errors import PassError
from graphopt.passes.analysis import analyze
from graphopt.passes.base import GraphPass, PassContext, PassResult, Property
from graphopt.passes.capture import capture
from graphopt.passes.dead_code import DeadCodeElimination
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes.manager import PassManager, default_passes
from graphopt.passes.remove_identity import RemoveIdentity
from graphopt.zoo import recalibrate_bn

aten = torch.ops.aten


def _ctx(x):
    return PassContext(x, None, {Property.ATEN, Property.INFERENCE})


def _same_function(model, gm, shape, trials=4, tol=1e-12):
    for _ in range(trials):
        x = torch.randn(*shape, dtype=torch.float64) * 3
        with torch.no_grad():
            want, got = model(x.clone()), gm(x.clone())
        assert (got - want).abs().max().item() <= tol * max(want.abs().max().item(), 1.0)


def _ops(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def channel_shuffle(x, groups):
    """torchvision.models.shufflenetv2.channel_shuffle as written there."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, num_channels, height, width)
    return x


class ShuffleAndHeads(nn.Module):
    """A channel shuffle, attention heads merged MobileViT-style (permute → contiguous → view), and a
    contiguous copy read through an elementwise op before its view."""

    def __init__(self, c=8, heads=2):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.qkv = nn.Linear(c, 3 * c)
        self.heads = heads

    def forward(self, x):
        x = channel_shuffle(self.conv(x), 2)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # b, hw, c
        q, k, v = self.qkv(t).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        ctx = torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # b, heads, hw, d
        ctx = ctx.permute(0, 2, 1, 3).contiguous()
        ctx = ctx.view(b, h * w, c)
        y = torch.relu(x.transpose(2, 3).contiguous())  # elementwise ops keep the transposed strides
        return ctx.view(b, -1) + y.view(b, -1)


def test_removing_copies_turns_the_views_that_need_them_into_reshapes():
    model = ShuffleAndHeads().double().eval()
    x = (torch.randn(2, 8, 4, 6, dtype=torch.float64),)
    gm = capture(model, x).graph_module
    result = RemoveIdentity().run(gm, _ctx(x))
    out = result.graph_module
    assert aten.contiguous.default not in _ops(out)
    assert result.stats["views_made_reshapes"] >= 3
    _same_function(model, out, (2, 8, 4, 6))
    assert not RemoveIdentity().run(out, _ctx(x)).modified
    analyze(out, x)  # shapes propagate (this was the ShapeProp error)


def test_channel_shuffle_and_attention_compile_and_match():
    model = ShuffleAndHeads().eval()
    x = torch.randn(1, 8, 4, 6)
    cm = graphopt.compile(model, (x,), "host", verify=True, progress=False)
    with torch.no_grad():
        for xi in (x, torch.randn(1, 8, 4, 6)):
            assert float((cm(xi) - model(xi)).abs().max() / model(xi).abs().max()) <= 1e-4


def test_a_copy_that_protects_its_input_from_a_kept_in_place_write_stays():
    class CopyThenMutate(nn.Module):
        def forward(self, x):
            y = x * 1.5
            z = y.clone()
            flat = z.view(-1)  # keeps z.relu_() in place (read through an earlier alias)
            z.relu_()
            return flat.view_as(y) + y  # y must not see the relu

    model = CopyThenMutate()
    x = (torch.randn(3, 4, dtype=torch.float64),)
    c = capture(model, x)
    assert c.passes[-1].declined  # functionalize kept relu_
    result = RemoveIdentity().run(c.graph_module, _ctx(x))
    assert aten.clone.default in _ops(result.graph_module)
    assert any("in-place op writes" in d.reason for d in result.declined)
    _same_function(model, result.graph_module, (3, 4))


class LiteMLA(nn.Module):
    """timm's EfficientViT LiteMLA as written there: ReLU linear attention computed in float32 under
    ``torch.autocast(enabled=False)``, here also inside a no_grad block."""

    def __init__(self, dim=8, heads=2, eps=1e-5):
        super().__init__()
        self.dim, self.heads, self.eps = dim // heads, heads, eps
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.aggreg = nn.Sequential(nn.Conv2d(3 * dim, 3 * dim, 5, padding=2, groups=3 * dim, bias=False),
                                    nn.Conv2d(3 * dim, 3 * dim, 1, groups=3 * heads, bias=False))
        self.kernel_func = nn.ReLU(inplace=False)
        self.proj = nn.Sequential(nn.Conv2d(2 * dim, dim, 1, bias=False), nn.BatchNorm2d(dim))

    def _attn(self, q, k, v):
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v.float()
        kv = k.transpose(-1, -2) @ v
        out = q @ kv
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        return out.to(dtype)

    def forward(self, x):
        B, _, H, W = x.shape
        qkv = self.qkv(x)
        multi_scale_qkv = torch.cat([qkv, self.aggreg(qkv)], dim=1)
        multi_scale_qkv = multi_scale_qkv.reshape(B, -1, 3 * self.dim, H * W).transpose(-1, -2)
        q, k, v = multi_scale_qkv.chunk(3, dim=-1)
        q = self.kernel_func(q)
        k = self.kernel_func(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        with torch.no_grad():
            with torch.autocast(device_type=v.device.type, enabled=False):
                out = self._attn(q, k, v)
        out = out.transpose(-1, -2).reshape(B, -1, H, W)
        return x + self.proj(out)


def test_no_grad_and_disabled_autocast_regions_are_inlined_and_passes_see_inside():
    model = recalibrate_bn(LiteMLA(), (torch.randn(2, 8, 6, 6),)).double()
    x = (torch.randn(1, 8, 6, 6, dtype=torch.float64),)
    c = capture(model, x)
    inline = c.passes[0]
    assert inline.name == "inline-regions" and inline.stats["by_op"] == {
        "wrap_with_set_grad_enabled": 1, "wrap_with_autocast": 1}
    gm = c.graph_module
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and isinstance(getattr(gm, n.target, None), nn.Module)]
    assert not [t for t in _ops(gm) if "higher_order" in str(t)]
    assert aten.bmm.default in _ops(gm) or aten.matmul.default in _ops(gm)  # the attention is in the graph
    gm, records = PassManager(default_passes(), verify=True).run(gm, _ctx(x))
    assert all(r.max_rel_error <= 1e-6 for r in records)  # the attention runs in float32, as written
    _same_function(model, gm, (1, 8, 6, 6), tol=1e-6)


def test_enabled_autocast_region_is_declined_with_the_user_line():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.c(x)
            return y.float()

    c = capture(Mixed().eval(), (torch.randn(1, 3, 4, 4),))
    (decline,) = c.passes[0].declined
    assert "reduced precision" in decline.reason and "test_semantics.py" in decline.where


class Branchy(nn.Module):
    """torch.cond with convs and BN in both branches: its branch modules are get_attr'd GraphModules."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dead = nn.Linear(4, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        _ = self.dead(x.mean((2, 3)))  # dead code next to the cond
        return torch.cond(y.mean() > 0, lambda t: torch.relu(t) * 2, lambda t: t - 1, (y,))


def test_cond_branches_stay_referenced_through_every_pass():
    model = recalibrate_bn(Branchy(), (torch.randn(2, 4, 6, 6),)).double()
    x = (torch.randn(1, 4, 6, 6, dtype=torch.float64),)
    gm = capture(model, x).graph_module
    gm, records = PassManager([RemoveIdentity(), FoldBatchNorm(), DeadCodeElimination()], verify=True).run(gm, _ctx(x))
    assert records[1].stats["folded"] == 1 and records[2].modified
    gm.graph.lint()
    for shift in (-3.0, 3.0):  # both branches
        xi = torch.randn(1, 4, 6, 6, dtype=torch.float64) + shift
        with torch.no_grad():
            assert torch.allclose(gm(xi), model(xi), rtol=1e-12, atol=1e-12)


def test_cond_model_compiles_and_matches_on_both_branches():
    model = recalibrate_bn(Branchy(), (torch.randn(2, 4, 6, 6),))
    cm = graphopt.compile(model, (torch.randn(1, 4, 6, 6),), "host", verify=True, progress=False)
    with torch.no_grad():
        for shift in (-3.0, 3.0):
            xi = torch.randn(1, 4, 6, 6) + shift
            assert float((cm(xi) - model(xi)).abs().max() / model(xi).abs().max()) <= 1e-4


class _DropCopies(GraphPass):
    """identity removal as it was: drops contiguous() without looking at the views after it."""

    name = "drop-copies"

    def run(self, gm, ctx):
        for n in list(gm.graph.nodes):
            if n.op == "call_function" and n.target is aten.contiguous.default:
                n.replace_all_uses_with(n.args[0])
                gm.graph.erase_node(n)
        gm.recompile()
        return PassResult(gm, True)


class _Crash(GraphPass):
    name = "crash"

    def run(self, gm, ctx):
        view = next(n for n in gm.graph.nodes if n.target is aten.view.default)
        raise RuntimeError(f"cannot rewrite {view.name}")


_VIEW_FAILS = (r"node view_1 \(aten.view.default\) at \S*test_semantics.py:\d+ in forward: "
               r"x = channel_shuffle\(self.conv\(x\), 2\) raised RuntimeError: view size")


def test_a_pass_that_breaks_the_graph_is_a_graphopt_error_naming_the_user_line():
    model = ShuffleAndHeads().eval()
    x = (torch.randn(1, 8, 4, 6),)
    for verify in (True, False):
        with pytest.raises(PassError, match=_VIEW_FAILS) as info:
            graphopt.compile(model, x, "host", passes=[_DropCopies()], verify=verify, progress=False)
        assert ("after pass drop-copies" in str(info.value)) is verify
    with pytest.raises(PassError, match=r"pass crash failed at node view.*test_semantics.py.*graphopt bug"):
        graphopt.compile(model, x, "host", passes=[_Crash()], progress=False)
