"""Recipes: validation, the stop criterion on a scripted metric sequence, and a small end-to-end run."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import graphopt
from graphopt.distillation import loader
from graphopt.errors import ConfigError
from graphopt.pruning import PruneConfig, prune_iteratively
from graphopt.recipe import PruneStage, QuantStage, Recipe, Stop, optimize


class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(self.body(x))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    x = x + torch.randn(n, 1, 1, 1, generator=g) * 0.3  # per-image brightness offset
    y = (x.mean((1, 2, 3)) > 0).long()  # brighter than average
    return TensorDataset(x, y)


def test_stop_criterion_stops_at_the_right_step_on_a_scripted_metric_sequence():
    model, x = Net().eval(), (torch.randn(1, 1, 8, 8),)
    scripted = iter([0.95, 0.93, 0.85, 0.99])  # step 3 crosses the 0.9 floor
    seen = []

    def fine_tune(m, step):
        seen.append(step)
        return next(scripted)

    out = prune_iteratively(model, x, PruneConfig(target_macs=0.2), steps=4, fine_tune=fine_tune, min_metric=0.9)
    assert seen == [1, 2, 3]
    steps = out.graphopt_pruning.steps
    assert [s["metric"] for s in steps] == [0.95, 0.93, 0.85] and "discarded" in steps[-1]["stopped"]
    assert out.graphopt_pruning.macs_after == steps[1]["macs"]  # the model of step 2 is kept


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "does nothing"),
    (dict(prune=PruneStage()), "needs a budget"),
])
def test_recipe_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Recipe(**kwargs)


def test_stop_and_stage_validation():
    with pytest.raises(ConfigError, match="fraction"):
        Stop(max_macs=1.5)
    with pytest.raises(ConfigError, match="one pruning budget"):
        Stop(max_macs=0.5, max_params=0.5)
    with pytest.raises(ConfigError, match="min_accuracy"):
        Stop(min_accuracy=90)
    with pytest.raises(ConfigError, match="unknown recipe sections"):
        Recipe.from_dict({"prune": {}, "prunning": {}})
    r = Recipe.from_dict({"prune": {"steps": 2}, "quantize": {"weights": 8}, "stop": {"max_macs": 0.4},
                          "train": {"epochs": 1, "lr": 0.01}, "distill": True})
    assert r.prune.steps == 2 and r.stop.max_macs == 0.4 and r.distill and r.train.lr == 0.01


def test_optimize_end_to_end_on_host(tmp_path):
    torch.manual_seed(0)
    train, val = loader(_data(1024, 0), batch_size=64), loader(_data(512, 1), batch_size=128, shuffle=False)
    model = Net(width=64)  # host SIMD rounds channels to multiples of 16
    graphopt.training.fit(model, train, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                          graphopt.training.TrainConfig(epochs=4, lr=1e-2, progress=False))
    recipe = Recipe(prune=PruneStage(steps=2, epochs_per_step=2), quantize=QuantStage(weights=8, activations=8),
                    distill=True, stop=Stop(min_accuracy=0.8, max_macs=0.35),
                    train=graphopt.training.TrainConfig(epochs=1, lr=5e-3, progress=False))
    result = optimize(model, train, val, "host", recipe=recipe, out_dir=tmp_path, progress=False)
    steps = result.report.steps
    assert steps[0].step == "original" and steps[0].accuracy > 0.9
    kept = [s for s in steps if s.kept]
    assert kept[-1].step == "int8 PTQ" and kept[-1].weight_bits == 8
    assert steps[0].macs / kept[-1].macs >= 1 / 0.35 * 0.9
    assert all(s.accuracy >= 0.8 for s in kept)
    x = next(iter(val))[0][:1]
    torch.testing.assert_close(result.compiled(x), result.model(x), rtol=0, atol=1e-4)
    assert (tmp_path / "optimize.png").stat().st_size > 10_000 and "int8 PTQ" in (tmp_path / "optimize.md").read_text()
