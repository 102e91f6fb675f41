"""Structured pruning: the float64 oracle on every architecture family, budgets, report, training/export,
declines and bad input; magnitude pruning, sparse storage, penalties and the iterative schedule."""
import copy

import pytest
import torch
import torch.nn.functional as F
from prune_oracle import assert_oracle
from torch import nn

import graphopt
from graphopt.errors import ConfigError
from graphopt.pruning import apply_plan
from graphopt.zoo import MobileNetBlocks, PlainCNN, ResidualCNN, recalibrate_bn


class DenseNetish(nn.Module):
    """Concatenation of growing feature maps (index offsets), a transition conv, avg-pool head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
        self.b2 = nn.Sequential(nn.BatchNorm2d(14), nn.ReLU(), nn.Conv2d(14, 6, 3, padding=1))
        self.trans = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 12, 1), nn.AvgPool2d(2))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.b1(x)], 1)
        x = torch.cat([x, self.b2(x)], 1)
        return self.fc(self.trans(x).mean((2, 3)))


class GroupedChunk(nn.Module):
    """Grouped convs (groups=4 and 2), chunk into halves multiplied together (GLU), max-pool, flatten head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(16, 8, 1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        a, b = torch.relu(self.bn(self.c2(torch.relu(self.c1(x))))).chunk(2, dim=1)
        y = F.max_pool2d(self.c3(a * torch.sigmoid(b)), 2)
        return self.fc(torch.flatten(y, 1))


def _seeded(model, *shape):
    torch.manual_seed(0)
    x = (torch.randn(*shape),)
    return recalibrate_bn(model, x), x


def _families():
    return {
        "plain_cnn_flatten_linear": lambda: _seeded(PlainCNN(), 2, 1, 28, 28),
        "resnet_residual": lambda: _seeded(ResidualCNN(), 2, 3, 32, 32),
        "densenet_concat": lambda: _seeded(DenseNetish(), 2, 3, 16, 16),
        "mobilenetv2_depthwise": lambda: _seeded(MobileNetBlocks(), 2, 3, 32, 32),
        "grouped_conv_chunk": lambda: _seeded(GroupedChunk(), 2, 3, 8, 8),
    }


@pytest.mark.filterwarnings("ignore:graphopt.prune")  # tiny groups: the MACs target is coarse, the oracle is not
@pytest.mark.parametrize("family", list(_families()))
@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_oracle_pruned_equals_original_with_consumers_zeroed(family, criterion):
    model, x = _families()[family]()
    pruned = graphopt.prune(model, x, target_macs=0.5, criterion=criterion)
    report = pruned.graphopt_pruning
    assert report.macs_after < report.macs_before
    assert_oracle(model, pruned, x)


def test_oracle_on_transformers_resnet_and_bert_ffn():
    pytest.importorskip("transformers")
    from graphopt.zoo import hf_bert_tiny, hf_resnet

    model, x = hf_resnet()
    pruned = graphopt.prune(model, x, target_macs=0.5)
    assert pruned.graphopt_pruning.target["within_tolerance"]
    assert_oracle(model, pruned, x)

    model, x = hf_bert_tiny()
    pruned = graphopt.prune(model, x, ratio=0.5, protect_first=False)
    groups = pruned.graphopt_pruning.groups
    ffn = [g for g in groups if g["producers"] == ["model.bert.encoder.layer.0.intermediate.dense"]][0]
    assert ffn["channels_after"] == 64  # the FFN hidden layer is halved
    heads = [g for g in groups if g["producers"] == ["model.bert.encoder.layer.0.attention.self.query"]][0]
    assert not heads["prunable"] and "head pruning is not implemented" in heads["reasons"][0]
    assert_oracle(model, pruned, x)


@pytest.mark.parametrize("metric", ["target_macs", "target_params"])
def test_global_budget_met_within_two_percent(metric):
    model, x = _seeded(ResidualCNN(width=32), 1, 3, 32, 32)
    for fraction in (0.3, 0.5, 0.7):
        pruned = graphopt.prune(model, x, **{metric: fraction})
        r = pruned.graphopt_pruning
        measured = r.macs_after / r.macs_before if metric == "target_macs" else r.params_after / r.params_before
        assert abs(measured - fraction) <= 0.02, (fraction, measured)
        assert r.target["achieved"] == pytest.approx(measured, abs=1e-4)  # the cost model matches the measurement


def test_ratio_channel_multiple_and_protected_layers():
    model, x = _seeded(ResidualCNN(width=32), 1, 3, 32, 32)
    pruned = graphopt.prune(model, x, ratio=0.5, target="arm", exclude=("layers.2.*",), protect_first=True)
    r = pruned.graphopt_pruning
    assert r.config["channel_multiple"] == graphopt.get_target("arm").channel_multiple == 4
    for g in r.groups:
        if g["prunable"]:
            assert g["channels_after"] % 4 == 0 and g["channels_after"] == g["channels_before"] // 2
    assert pruned.stem[0].out_channels == 32  # first layer's output group protected
    assert pruned.layers[2].conv1.out_channels == 128 and pruned.layers[2].conv1.in_channels == 64
    reasons = " ".join(reason for g in r.groups for reason in g["reasons"])
    assert "excluded by the user" in reasons and "protect_first" in reasons
    layer = r.layers["layers.1.conv1"]
    assert layer["out_after"] == 32 and layer["macs_after"] < layer["macs_before"]
    assert r.to_dict()["groups"] and "plan" not in r.to_dict()


def test_pruned_model_trains_exports_and_state_dict_reloads(tmp_path):
    model, x = _seeded(MobileNetBlocks(), 2, 3, 32, 32)
    pruned = graphopt.prune(model, x, target_macs=0.5)
    pruned.train()
    loss = pruned(x[0]).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pruned.parameters())
    torch.export.export(pruned.eval(), x, strict=False)
    torch.save(pruned.state_dict(), tmp_path / "w.pt")
    fresh = apply_plan(MobileNetBlocks(), pruned.graphopt_pruning.plan)
    fresh.load_state_dict(torch.load(tmp_path / "w.pt"))
    torch.testing.assert_close(fresh.eval()(x[0]), pruned(x[0]))
    assert model.blocks[0].block[0].out_channels == 64, "the user's model must not be modified"


class _Unknown(nn.Module):
    """Channels through an op the analysis does not know (cumsum over channels) and a functional conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.kernel = nn.Parameter(torch.randn(8, 8, 1, 1))
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.cumsum(self.c1(x), dim=1)
        y = F.conv2d(torch.relu(self.c2(y)), self.kernel)
        return self.fc(torch.relu(self.c3(y)).mean((2, 3)))


def test_unknown_ops_and_functional_weights_are_declined_not_pruned():
    model, x = _seeded(_Unknown(), 1, 3, 12, 12)
    pruned = graphopt.prune(model, x, ratio=0.5)
    r = pruned.graphopt_pruning
    by_producer = {tuple(g["producers"]): g for g in r.groups}
    assert "not understood" in by_producer[("c1",)]["reasons"][0]
    assert "functional call" in by_producer[("c2",)]["reasons"][0]
    assert by_producer[("c3",)]["channels_after"] == 4
    assert {d.pass_name for d in r.declined} == {"prune-channels"} and len(r.declined) >= 2
    assert_oracle(model, pruned, x)


class _HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(self.c(x), 4).view(x.shape[0], 128)  # channel count fixed in the code
        return self.fc(y) + self.fc2(self.c2(x).mean((2, 3)))


def test_hard_coded_channel_count_is_detected_and_kept():
    model, x = _seeded(_HardCodedView(), 2, 3, 8, 8)
    pruned = graphopt.prune(model, x, ratio=0.5)
    r = pruned.graphopt_pruning
    assert pruned.c.out_channels == 8 and pruned.c2.out_channels == 4
    assert any("did not match" in n for n in r.notes)
    assert_oracle(model, pruned, x)


def test_nothing_prunable_warns_and_says_why():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LayerNorm(4 * 6 * 6))
    with pytest.warns(graphopt.GraphoptWarning, match="nothing"):
        pruned = graphopt.prune(model, (torch.randn(1, 3, 8, 8),), target_macs=0.5)
    r = pruned.graphopt_pruning
    assert r.macs_after == r.macs_before and any("nothing could be pruned" in n for n in r.notes)
    assert all(g["reasons"] for g in r.groups)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_macs": 1.5}, "target_macs"), ({"target_macs": 0}, "target_macs"), ({"ratio": -0.1}, "ratio"),
    ({"target_params": 1}, "target_params"), ({"target_macs": 0.5, "criterion": "l3"}, "criterion"),
    ({"target_macs": 0.5, "ratio": 0.5}, "one structured budget"), ({}, "nothing to prune"),
    ({"target_macs": 0.5, "channel_multple": 4}, "unknown pruning option"),
    ({"target_macs": 0.5, "exclude": "fc"}, "exclude"), ({"sparse_storage": True, "ratio": 0.2}, "sparsity"),
])
def test_bad_config_is_a_config_error(kwargs, match):
    model, x = _seeded(PlainCNN(), 1, 1, 28, 28)
    with pytest.raises(ConfigError, match=match):
        graphopt.prune(model, x, **kwargs)


def test_criterion_enum_and_string_are_equivalent():
    assert graphopt.PruneConfig(ratio=0.3, criterion="L2").criterion is graphopt.Criterion.L2
    model, x = _seeded(PlainCNN(), 1, 1, 28, 28)
    a = graphopt.prune(model, x, ratio=0.3, criterion=graphopt.Criterion.L2).graphopt_pruning.plan
    b = graphopt.prune(model, x, graphopt.PruneConfig(ratio=0.3, criterion="l2")).graphopt_pruning.plan
    assert a == b


def test_magnitude_masks_persist_through_fine_tuning_and_sparse_storage_saves_bytes(tmp_path):
    model, x = _seeded(PlainCNN(), 4, 1, 28, 28)
    info = graphopt.magnitude_prune(model, 0.8)
    assert info["sparsity"] == pytest.approx(0.8, abs=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x[0]).square().mean().backward()
        opt.step()
    fc = model.head[1]
    mask, original = fc.parametrizations.weight[0].mask, fc.parametrizations.weight.original
    assert (fc.weight[mask == 0] == 0).all() and (original.grad[mask == 0] == 0).all()  # masked weights stay out
    graphopt.remove_masks(model)
    assert isinstance(model.head[1].weight, nn.Parameter)
    stats = graphopt.save_sparse(model, tmp_path / "w.npz")
    assert stats["saved_bytes"] > 0.5 * stats["dense_bytes"]
    restored = copy.deepcopy(model)
    restored.load_state_dict(graphopt.load_sparse(tmp_path / "w.npz"))
    torch.testing.assert_close(restored.eval()(x[0]), model.eval()(x[0]), rtol=0, atol=0)
    per_layer = graphopt.magnitude_prune(model, 0.5, scope="layer")
    assert all(v == pytest.approx(0.5, abs=0.01) for v in per_layer["layers"].values())
    with pytest.raises(ConfigError, match="scope"):
        graphopt.magnitude_prune(model, 0.5, scope="everywhere")


def test_penalties_are_differentiable_and_match_the_pruning_norm():
    model, x = _seeded(ResidualCNN(), 1, 3, 32, 32)
    groups = graphopt.prunable_groups(model, x)
    for norm in ("l1", "l2"):
        for p in (graphopt.filter_norm_penalty(model, 1e-3, norm),
                  graphopt.filter_norm_penalty(model, 1e-3, norm, groups), graphopt.weight_penalty(model, 1e-3, norm)):
            model.zero_grad()
            p.backward()
            assert p.item() > 0 and model.layers[0].conv1.weight.grad.abs().sum() > 0
    # group L2 of one residual channel = sqrt of the sum of its producers' squared filter norms
    g = [g for g in groups.prunable_groups if "stem.0" in g.producers][0]
    single = copy.deepcopy(groups)
    single.groups = [type(g)(g.id, g.producers, g.classes[:1])]
    want = sum(model.get_submodule(m.module).weight[m.index].pow(2).sum()
               for m in g.classes[0] if m.role.value == "out")
    torch.testing.assert_close(graphopt.filter_norm_penalty(model, 1.0, "l2", single), want.sqrt())
    with pytest.raises(ConfigError, match="norm"):
        graphopt.filter_norm_penalty(model, 1e-4, "l7")


def test_iterative_schedule_calls_fine_tune_and_stops_at_the_floor():
    model, x = _seeded(ResidualCNN(), 1, 3, 32, 32)
    calls = []

    def fine_tune(m, step):
        calls.append((step, sum(p.numel() for p in m.parameters())))
        return 1.0 - 0.1 * step  # a metric that degrades each step

    result = graphopt.prune_iteratively(model, x, graphopt.PruneConfig(target_macs=0.4), steps=4, fine_tune=fine_tune)
    r = result.graphopt_pruning
    assert [c[0] for c in calls] == [1, 2, 3, 4] and calls[0][1] > calls[-1][1]
    assert abs(r.macs_after / r.macs_before - 0.4) <= 0.02 and len(r.steps) == 4
    calls.clear()
    floored = graphopt.prune_iteratively(model, x, graphopt.PruneConfig(target_macs=0.4), steps=4,
                                         fine_tune=fine_tune, min_metric=0.75)
    steps = floored.graphopt_pruning.steps
    assert len(steps) == 3 and "stopped" in steps[-1]  # step 3 (metric 0.7) discarded; the step-2 model returned
    assert sum(p.numel() for p in floored.parameters()) == calls[1][1]
