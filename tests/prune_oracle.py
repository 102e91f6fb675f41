"""The exact float64 oracle shared by the pruning tests.

The original model with the removed channels' *consumer* weights zeroed (every consumer of every
removed channel, across the whole group) must compute the same function as the pruned model.
The zeroing here is written independently of graphopt's own check, from the plan alone.
"""
import copy

import torch
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def zero_consumers(model: nn.Module, plan: dict) -> nn.Module:
    model = copy.deepcopy(model)
    for path, keep in plan.items():
        mod = model.get_submodule(path)
        if "in" not in keep:
            continue
        if isinstance(mod, nn.Linear):
            removed = sorted(set(range(mod.in_features)) - set(keep["in"]))
            mod.weight[:, removed] = 0
        elif isinstance(mod, CONVS):
            removed = sorted(set(range(mod.in_channels)) - set(keep["in"]))
            per_group = mod.in_channels // mod.groups
            if per_group == 1:  # depthwise: input channel i feeds output block i
                mult = mod.out_channels // mod.groups
                for i in removed:
                    mod.weight[i * mult:(i + 1) * mult] = 0
            else:
                for i in removed:
                    g = i // per_group
                    rows = slice(g * mod.out_channels // mod.groups, (g + 1) * mod.out_channels // mod.groups)
                    mod.weight[rows, i % per_group] = 0
    return model


def assert_oracle(model: nn.Module, pruned: nn.Module, example: tuple, trials: int = 3, scale: float = 1.0):
    """Pruned == original-with-consumers-zeroed in float64 on several inputs; and it is smaller."""
    plan = pruned.graphopt_pruning.plan
    reference = zero_consumers(model, plan).double().eval()
    got_model = copy.deepcopy(pruned).double().eval()
    for t in range(trials):
        g = torch.Generator().manual_seed(100 + t)
        x = tuple(torch.randn(e.shape, generator=g, dtype=torch.float64) * scale if e.is_floating_point() else e
                  for e in example)
        with torch.no_grad():
            want, got = reference(*x), got_model(*x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * max(1.0, want.abs().max().item()))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(pruned) < n(model), "pruning removed no parameters"
