"""The pruning budget: met within ±2 % wherever the channel groups allow; where not, the prune report, compile's
report and a GraphoptWarning say why, with the numbers (tests/test_fuzz.py checks the same on random graphs)."""
import pytest
import torch
from prune_oracle import assert_oracle
from torch import nn

import graphopt
from graphopt.zoo import MobileNetBlocks, ResidualCNN, recalibrate_bn


def _seeded(model, *shape):
    torch.manual_seed(0)
    x = (torch.randn(*shape),)
    return recalibrate_bn(model, x), x


@pytest.mark.parametrize("family, multiple", [("resnet", 4), ("mobilenet", 1)])
def test_budget_met_across_budgets_and_channel_multiples(family, multiple):
    model, x = (_seeded(ResidualCNN(width=16), 1, 3, 16, 16) if family == "resnet"
                else _seeded(MobileNetBlocks(), 1, 3, 16, 16))
    for fraction in (0.35, 0.6, 0.85):
        pruned = graphopt.prune(model, x, target_macs=fraction, channel_multiple=multiple)
        r = pruned.graphopt_pruning
        measured = r.macs_after / r.macs_before
        assert abs(measured - fraction) <= 0.02 and r.target["within_tolerance"], (fraction, measured, r.notes)
        assert r.target["achieved"] == pytest.approx(measured, abs=1e-4) and "limit" not in r.target
    assert_oracle(model, pruned, x)


class _Stack(nn.Module):
    """conv 3→8 → conv 8→8 → conv 8→4 (its channels reach the output, so that group is declined)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _macs(kept_a: int, kept_b: int, positions: int = 64) -> int:
    return positions * (kept_a * 3 * 9 + kept_b * kept_a * 9 + 4 * kept_b)


def test_unreachable_budget_names_minimum_unprunable_share_and_declines():
    model, x = _seeded(_Stack(), 1, 3, 8, 8)
    with pytest.warns(graphopt.GraphoptWarning, match="reachable minimum"):
        pruned = graphopt.prune(model, x, target_macs=0.1, exclude=("a",))  # a's group is declined by the user
    r = pruned.graphopt_pruning
    lim = r.target["limit"]
    # a keeps 8 channels (declined); b keeps ceil(8 * (1 - max_group_ratio)) = 1; c's 4 outputs reach the output
    lowest, unprunable = _macs(8, 1) / _macs(8, 8), _macs(8, 0) / _macs(8, 8)
    assert lim["reason"] == "below the reachable minimum" and not r.target["within_tolerance"]
    assert lim["reachable_min"] == pytest.approx(lowest, abs=1e-4) == r.target["achieved"]
    assert lim["unprunable_share"] == pytest.approx(unprunable, abs=1e-4)
    assert lim["minimum_channels_share"] == pytest.approx(lowest - unprunable, abs=1e-4)
    assert lim["declined_groups"] == 2 and pruned.b.out_channels == 1
    note = next(n for n in r.notes if "not met" in n)
    assert str(lim["reachable_min"]) in note and str(lim["unprunable_share"]) in note and "declined" in note
    assert_oracle(model, pruned, x)


def test_coarse_channel_steps_are_explained_with_the_smallest_step():
    model, x = _seeded(_Stack(), 1, 3, 8, 8)
    with pytest.warns(graphopt.GraphoptWarning, match="no channel step gets closer"):
        pruned = graphopt.prune(model, x, target_macs=0.75, channel_multiple=4)  # a and b keep 8 or 4 channels
    r = pruned.graphopt_pruning
    lim, miss = r.target["limit"], abs(r.target["achieved"] - 0.75)
    assert lim["reason"] == "channel steps too coarse" and miss > 0.02
    assert lim["smallest_step"] >= 2 * miss  # no single step could have got closer
    reachable = sorted(_macs(a, b) / _macs(8, 8) for a in (8, 4) for b in (8, 4))
    assert min(abs(v - 0.75) for v in reachable) == pytest.approx(miss, abs=1e-4)  # the best the groups allow


def test_model_without_macs_reports_instead_of_dividing_by_zero():
    model = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.ReLU())
    with pytest.warns(graphopt.GraphoptWarning, match="no macs"):
        pruned = graphopt.prune(model, (torch.randn(1, 3, 7, 7),), target_macs=0.5)
    assert pruned.graphopt_pruning.target["limit"]["reason"] == "the model has no macs to remove"


def test_compile_report_says_the_budget_was_not_met():
    model, x = _seeded(_Stack(), 1, 3, 8, 8)
    with pytest.warns(graphopt.GraphoptWarning, match="not met"):
        cm = graphopt.compile(model, x, "host", prune=graphopt.PruneConfig(target_macs=0.1), progress=False)
    target = cm.report.pruning["target"]
    assert target["limit"]["reason"] == "below the reachable minimum"
    md = cm.report.to_markdown()
    assert "budget not met" in md and f"reachable minimum {target['limit']['reachable_min']}" in md
    with torch.no_grad(), pytest.warns(graphopt.GraphoptWarning):
        pruned = graphopt.prune(model, x, target_macs=0.1, target="host")
        assert (cm(*x) - pruned.eval()(*x)).abs().max().item() <= 1e-4 * pruned(*x).abs().max().item()
