"""Differentiable penalties that push weights towards what the pruners remove.

    loss = task_loss + graphopt.filter_norm_penalty(model, weight=1e-4, norm="l2")
    loss = task_loss + graphopt.weight_penalty(model, weight=1e-5, norm="l1")

`filter_norm_penalty` is group lasso over filters: the sum over pruning units of the unit's L2
norm (or L1), the same norm `graphopt.prune` ranks by. With ``groups=graphopt.prunable_groups(model,
(x,))`` a unit is a whole coupled channel (every producer filter in the dependency group); without,
every output filter of every ``nn.Conv*``/``nn.Linear``. `weight_penalty` is plain L1/L2 on those
weights. Refused (`ConfigError`): unknown norms, negative weights, models without such layers.
"""
from __future__ import annotations

import enum

import torch
from torch import nn

from graphopt.config import as_enum
from graphopt.errors import ConfigError
from graphopt.passes.capture import check_model
from graphopt.passes.dependency import DependencyGraph, Role

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class Norm(str, enum.Enum):
    L1 = "l1"
    L2 = "l2"


def _check(model: nn.Module, weight: float, norm) -> tuple[Norm, list[tuple[str, nn.Module]]]:
    check_model(model)
    norm = as_enum(Norm, norm, "norm")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ConfigError(f"weight={weight!r} must be a non-negative number, e.g. 1e-4")
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, _LAYERS)]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no nn.Conv/nn.Linear layers to regularize")
    return norm, layers


def filter_norm_penalty(model: nn.Module, weight: float = 1e-4, norm: Norm | str = Norm.L2,
                        groups: DependencyGraph | None = None) -> torch.Tensor:
    """``weight`` · Σ over pruning units of ‖unit‖ (L2: group lasso; L1: sum of |w|)."""
    norm, layers = _check(model, weight, norm)
    if groups is None:
        rows = [m.weight.flatten(1) for _, m in layers]
        if norm is Norm.L1:
            return weight * sum(r.abs().sum() for r in rows)
        return weight * sum(r.pow(2).sum(1).clamp_min(1e-12).sqrt().sum() for r in rows)
    units = [cls for g in groups.prunable_groups for cls in g.classes]
    if not units:
        raise ConfigError("no prunable channel groups to regularize; call without groups= to penalize every filter")
    index: dict[str, tuple[list[int], list[int]]] = {}
    for u, cls in enumerate(units):
        for m in cls:
            if m.role is Role.OUT:
                rows_, unit_ids = index.setdefault(m.module, ([], []))
                rows_.append(m.index)
                unit_ids.append(u)
    first = next(iter(model.parameters()))
    per_unit = torch.zeros(len(units), dtype=first.dtype, device=first.device)
    for path, (rows_, unit_ids) in index.items():
        w = model.get_submodule(path).weight.flatten(1)[torch.as_tensor(rows_)]
        contrib = w.abs().sum(1) if norm is Norm.L1 else w.pow(2).sum(1)
        per_unit = per_unit.index_add(0, torch.as_tensor(unit_ids), contrib.to(per_unit.dtype))
    return weight * (per_unit.sum() if norm is Norm.L1 else per_unit.clamp_min(1e-12).sqrt().sum())


def weight_penalty(model: nn.Module, weight: float = 1e-5, norm: Norm | str = Norm.L2) -> torch.Tensor:
    """``weight`` · Σ|w| (L1) or Σw² (L2) over the weights of every nn.Conv*/nn.Linear."""
    norm, layers = _check(model, weight, norm)
    if norm is Norm.L1:
        return weight * sum(m.weight.abs().sum() for _, m in layers)
    return weight * sum(m.weight.pow(2).sum() for _, m in layers)
