"""Float64 numerical oracles for the inference passes, idempotence, declines, and the pass manager."""
import pytest
import torch
from torch import nn

from graphopt.errors import NumericsError, PassError
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


def _captured64(model, *shapes):
    model = model.double().eval()
    x = tuple(torch.randn(*s, dtype=torch.float64) for s in shapes)
    return model, capture(model, x).graph_module, x


def _assert_same_function(reference, gm, shapes, trials=4):
    for _ in range(trials):
        x = tuple(torch.randn(*s, dtype=torch.float64) * 3 for s in shapes)
        want, got = reference(*x), gm(*x)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-12 * max(scale, 1.0), "pass changed the function"


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise, no bias
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv1d(8, 4, 1)
        self.b3 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 6)
        self.b4 = nn.BatchNorm1d(6, affine=False)

    def forward(self, x):
        y = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        y = self.b3(self.c3(y.flatten(2)))
        return self.b4(self.fc(y.mean(2)))


def test_fold_batchnorm_matches_float64_and_removes_every_bn():
    model = recalibrate_bn(ConvBN(), (torch.randn(4, 3, 8, 8),))
    model, gm, x = _captured64(model, (2, 3, 8, 8))
    result = FoldBatchNorm().run(gm, _ctx(x))
    assert result.modified and result.stats["folded"] == 4 and not result.declined
    assert aten.batch_norm.default not in _targets(result.graph_module)
    _assert_same_function(model, result.graph_module, [(2, 3, 8, 8)])
    assert not FoldBatchNorm().run(result.graph_module, _ctx(x)).modified


class SharedProducer(nn.Module):
    """conv output feeds BN *and* a residual: folding would corrupt the residual."""

    def __init__(self):
        super().__init__()
        self.pre = nn.BatchNorm2d(3)  # no producer: stays a scale/shift
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.BatchNorm2d(3)
        self.t = nn.ConvTranspose2d(3, 3, 2, stride=2)
        self.bt = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.c(self.pre(x))
        return self.bt(self.t(self.b(y) + y))


def test_fold_batchnorm_declines_with_reasons_and_keeps_the_function():
    model = recalibrate_bn(SharedProducer(), (torch.randn(4, 3, 8, 8),))
    model, gm, x = _captured64(model, (1, 3, 8, 8))
    result = FoldBatchNorm().run(gm, _ctx(x))
    reasons = sorted(d.reason.split(";")[0].split(" (")[0] for d in result.declined)
    assert len(result.declined) == 3, reasons
    assert any("no conv/linear producer" in r for r in reasons)
    assert any("2 users" in d.reason for d in result.declined)
    assert any("transposed convolution" in d.reason for d in result.declined)
    assert all(d.where and d.node for d in result.declined)
    assert not result.modified
    _assert_same_function(model, result.graph_module, [(1, 3, 8, 8)])


class Identities(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fd = nn.Dropout2d(0.3)
        self.idn = nn.Identity()

    def forward(self, x):
        y = self.fd(self.drop(x)).clone() * 1
        y = y.contiguous().to(torch.float64)[:, :, :, :] + 0
        y = y.permute(0, 1, 2, 3).reshape(y.shape) / 1
        return torch.nn.functional.pad(self.idn(y), (0, 0)) - 0 + x


def test_remove_identity_removes_every_rule_hit():
    model, gm, x = _captured64(Identities(), (2, 3, 4, 5))
    before = _targets(gm)
    result = RemoveIdentity().run(gm, _ctx(x))
    after = _targets(result.graph_module)
    assert result.modified
    assert after == [aten.add.Tensor], f"left: {after} (from {before})"
    _assert_same_function(model, result.graph_module, [(2, 3, 4, 5)])
    assert not RemoveIdentity().run(result.graph_module, _ctx(x)).modified


def test_remove_identity_keeps_copy_of_input_returned_as_output():
    class Copy(nn.Module):
        def forward(self, x):
            return x.clone()

    _, gm, x = _captured64(Copy(), (3,))
    result = RemoveIdentity().run(gm, _ctx(x))
    assert not result.modified
    out = result.graph_module(*x)
    assert out.data_ptr() != x[0].data_ptr()


class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        _ = self.unused(x) * 2  # computed, never used
        return self.used(x)


def test_dead_code_removes_nodes_and_their_parameters():
    model, gm, x = _captured64(DeadBranch(), (2, 4))
    result = DeadCodeElimination().run(gm, _ctx(x))
    assert result.modified and result.stats["nodes_removed"] >= 2 and result.stats["tensors_removed"] == 2
    names = {n for n, _ in result.graph_module.named_parameters()}
    assert not any(n.startswith("unused") for n in names)
    _assert_same_function(model, result.graph_module, [(2, 4)])
    assert not DeadCodeElimination().run(result.graph_module, _ctx(x)).modified


def test_default_pipeline_is_idempotent_on_zoo_models():
    from graphopt.zoo import ZOO

    for name in ("plain_cnn", "residual_cnn", "mobilenet_blocks", "tiny_transformer"):
        model, x = ZOO[name].factory()
        gm = capture(model, x).graph_module
        gm, first = PassManager(default_passes(), verify=True).run(gm, _ctx(x))
        assert any(r.modified for r in first), name
        assert all(r.max_rel_error < 1e-4 for r in first), name
        _, second = PassManager(default_passes()).run(gm, _ctx(x))
        assert not any(r.modified for r in second), (name, [r.name for r in second if r.modified])


class _Perturb(GraphPass):
    """A deliberately wrong pass: scales the first parameter."""

    name = "perturb"

    def run(self, gm, ctx):
        p = next(gm.parameters())
        with torch.no_grad():
            p.mul_(1.5)
        return PassResult(gm, True)


class _NeedsMagic(GraphPass):
    name = "needs-magic"
    requires = frozenset({"magic"})

    def run(self, gm, ctx):
        return PassResult(gm, False)


def test_pass_manager_verify_catches_a_wrong_pass():
    model, gm, x = _captured64(DeadBranch(), (2, 4))
    with pytest.raises(NumericsError, match="perturb"):
        PassManager([_Perturb()], verify=True).run(gm, _ctx(x))


def test_pass_manager_checks_requirements_before_running():
    _, gm, x = _captured64(DeadBranch(), (2, 4))
    with pytest.raises(PassError, match="magic"):
        PassManager([DeadCodeElimination(), _NeedsMagic()]).run(gm, _ctx(x))
    with pytest.raises(PassError, match="inference"):
        PassManager([FoldBatchNorm()]).run(gm, PassContext(x, None, {Property.ATEN}))
