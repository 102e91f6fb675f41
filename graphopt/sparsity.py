"""Unstructured magnitude pruning (masks that persist through fine-tuning) and sparse weight storage.

    graphopt.magnitude_prune(model, sparsity=0.8)     # weight = original * mask (a parametrization)
    ... fine-tune: masked weights stay zero, their gradients are zero ...
    graphopt.remove_masks(model)                       # bake the zeros into plain parameters
    graphopt.save_sparse(model, "w.sparse.npz")        # bitmask + non-zero values; returns byte counts

Masks are `torch.nn.utils.parametrize` parametrizations on the ``weight`` of every
``nn.Conv1d/2d/3d`` and ``nn.Linear`` (excluding fnmatch patterns of module paths). Calling
`magnitude_prune` again on a masked model re-ranks the masked weights and tightens the masks.
Honest limits: zeros in dense tensors do not make graphopt's dense kernels faster; the win is
storage — the sparse file is smaller than the dense weights, and ``load_sparse`` restores them.
Refused (`ConfigError`): a model that is not an `nn.Module`, sparsity outside [0, 1), unknown
scopes, models with no such layers, paths that are not str/Path; `ArtifactError`: a file that
cannot be written, or read as a `save_sparse` file.
"""
from __future__ import annotations

import enum
import fnmatch
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from graphopt.config import as_enum
from graphopt.errors import ArtifactError, ConfigError
from graphopt.passes.capture import check_model

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class Scope(str, enum.Enum):
    GLOBAL = "global"  # one magnitude threshold over all layers
    LAYER = "layer"  # the same sparsity in every layer


class WeightMask(nn.Module):
    """Parametrization ``weight = original * mask``; the mask is a buffer saved in ``state_dict``."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _layers(model: nn.Module, exclude: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, _PRUNABLE) and not any(fnmatch.fnmatchcase(p, pat) for pat in exclude)]


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, *, scope: Scope | str = Scope.GLOBAL,
                    exclude: tuple[str, ...] = ()) -> dict:
    """Mask the smallest-magnitude weights of ``model`` in place; returns achieved sparsity per layer."""
    check_model(model)
    scope = as_enum(Scope, scope, "scope")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity={sparsity!r} must be a number in [0, 1), e.g. 0.8 to zero 80 % of weights")
    layers = _layers(model, tuple(exclude))
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no nn.Conv/nn.Linear layers to magnitude-prune "
                          f"(after exclude={list(exclude)})")
    weights = [m.weight.detach().abs() for _, m in layers]
    if scope is Scope.GLOBAL:
        flat = torch.cat([w.flatten() for w in weights])
        k = int(round(sparsity * flat.numel()))
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[flat.argsort()[:k]] = False
        masks = list(keep.split([w.numel() for w in weights]))
    else:
        masks = []
        for w in weights:
            keep = torch.ones(w.numel(), dtype=torch.bool)
            keep[w.flatten().argsort()[:int(round(sparsity * w.numel()))]] = False
            masks.append(keep)
    report = {}
    for (path, mod), w, keep in zip(layers, weights, masks, strict=True):
        mask = keep.reshape(w.shape).to(w.dtype)
        if parametrize.is_parametrized(mod, "weight"):
            mod.parametrizations.weight[0].mask.copy_(mask)
        else:
            parametrize.register_parametrization(mod, "weight", WeightMask(mask))
        report[path] = round(1 - float(keep.float().mean()), 4)
    total = sum(w.numel() for w in weights)
    zeros = sum(r * w.numel() for r, w in zip(report.values(), weights, strict=True))
    return {"scope": scope.value, "sparsity": round(zeros / total, 4), "layers": report}


def remove_masks(model: nn.Module) -> nn.Module:
    """Replace each mask parametrization by a plain parameter holding the masked weight (in place)."""
    check_model(model)
    for _, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight") and any(
                isinstance(p, WeightMask) for p in mod.parametrizations.weight):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return model


def _effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers as the model computes with them (masked weights, no mask buffers)."""
    state = {}
    for path, mod in model.named_modules():
        prefix = f"{path}." if path else ""
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            state[prefix + name] = t.detach()
        if parametrize.is_parametrized(mod):
            for name in mod.parametrizations:
                state[prefix + name] = getattr(mod, name).detach()
    return {k: v for k, v in state.items() if ".parametrizations." not in k}


def _path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"path must be a file path (str or Path), got {type(path).__name__}")
    return Path(path)


def save_sparse(model: nn.Module, path: str | Path) -> dict:
    """Write the model's weights as one file: per tensor a bitmask + its non-zero values (dense where smaller).

    Returns ``{"dense_bytes", "sparse_bytes", "saved_bytes", "zero_fraction"}``; ``sparse_bytes`` is
    the file size on disk. This shrinks storage only; inference still runs dense kernels.
    """
    check_model(model)
    path = _path(path)
    index, masks, data, dense, zeros, floats = [], [], [], 0, 0, 0
    offsets = [0, 0]  # bytes written to masks, data
    for name, t in _effective_state(model).items():
        a = np.ascontiguousarray(t.cpu().numpy())
        dense += a.nbytes
        entry = {"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "data": offsets[1]}
        nz = a != 0
        if t.is_floating_point():
            floats += a.size
            zeros += int(a.size - nz.sum())
        packed = np.packbits(nz.ravel())
        if t.is_floating_point() and packed.nbytes + int(nz.sum()) * a.itemsize < a.nbytes:
            entry["mask"] = offsets[0]
            masks.append(packed)
            offsets[0] += packed.nbytes
            payload = a[nz]
        else:
            payload = a.ravel()
        data.append(payload.view(np.uint8))
        offsets[1] += payload.nbytes
        index.append(entry)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, index=np.frombuffer(json.dumps(index).encode(), dtype=np.uint8),
                     masks=np.concatenate(masks) if masks else np.zeros(0, np.uint8),
                     data=np.concatenate(data) if data else np.zeros(0, np.uint8))
    except OSError as exc:
        raise ArtifactError(f"cannot write sparse weights to {path}: {exc}. Choose a writable path.") from exc
    size = os.path.getsize(path)
    return {"dense_bytes": dense, "sparse_bytes": size, "saved_bytes": dense - size,
            "zero_fraction": round(zeros / max(floats, 1), 4)}


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored by `save_sparse` (dense tensors; load with ``model.load_state_dict``)."""
    path = _path(path)
    try:
        with np.load(path) as z:
            index, masks, data = json.loads(z["index"].tobytes()), z["masks"], z["data"]
    except (OSError, ValueError, KeyError) as exc:  # missing, not an .npz, or an .npz save_sparse did not write
        raise ArtifactError(f"cannot read sparse weights from {path}: {exc}. Pass a file that "
                            "graphopt.save_sparse wrote.") from exc
    out = {}
    for e in index:
        dtype, n = np.dtype(e["dtype"]), int(np.prod(e["shape"]))
        if "mask" in e:
            keep = np.unpackbits(masks[e["mask"]:e["mask"] + (n + 7) // 8])[:n].astype(bool)
            a = np.zeros(n, dtype=dtype)
            a[keep] = data[e["data"]:e["data"] + int(keep.sum()) * dtype.itemsize].view(dtype)
        else:
            a = data[e["data"]:e["data"] + n * dtype.itemsize].view(dtype).copy()
        out[e["name"]] = torch.from_numpy(a.reshape(e["shape"]))
    return out
