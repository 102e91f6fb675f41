"""A small, plain fine-tuning loop with progress bars, per-epoch checkpoints and resume.

`fit` trains ``model`` on batches ``(x, y)`` with a loss function the caller supplies (plain
cross-entropy, distillation, plus optional penalties) at a learning rate that is constant, decays
by a cosine (fine-tuning) or warms up then decays (one cycle: training from scratch), stepped per
batch. With ``checkpoint_dir`` set, every epoch
ends with an atomic checkpoint (model, optimizer, schedule, epoch, history); a rerun with the same folder
resumes after the last finished epoch — an interrupted run loses at most the epoch in progress,
and, with the global RNG and a DataLoader's shuffling generator restored, resumes exactly.
Refuses (`ConfigError`): a model that is not an `nn.Module`, data that is not an iterable of
batches, empty data, non-positive epochs or learning rate, and a checkpoint written for a
different model structure (the error says to use a fresh folder).
"""
from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from graphopt import progress
from graphopt.config import as_enum
from graphopt.errors import ConfigError
from graphopt.passes.capture import check_model

CHECKPOINT = "checkpoint.pt"


class Optimizer(str, enum.Enum):
    ADAM = "adam"
    SGD = "sgd"


class Schedule(str, enum.Enum):
    """Learning rate over the run, stepped every batch."""

    CONSTANT = "constant"
    COSINE = "cosine"  # cosine decay from lr to 0: fine-tuning a trained model (QAT, pruning, distillation)
    ONE_CYCLE = "one_cycle"  # 15 % warm-up to lr, then cosine to ~0: training from scratch


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    lr: float = 1e-3
    optimizer: Optimizer = Optimizer.ADAM
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.CONSTANT
    checkpoint_dir: Path | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "optimizer", as_enum(Optimizer, self.optimizer, "optimizer"))
        object.__setattr__(self, "schedule", as_enum(Schedule, self.schedule, "schedule"))
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int):
            raise ConfigError(f"epochs={self.epochs!r} must be an int, e.g. epochs=3")
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{name}={v!r} must be a number")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.checkpoint_dir is not None:
            object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir))


def check_batches(data, what: str = "data") -> None:
    """`ConfigError` unless ``data`` is an iterable of batches (a bare tensor is refused: iterating
    it would yield single samples)."""
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        got = "a single tensor" if isinstance(data, torch.Tensor) else type(data).__name__
        raise ConfigError(f"{what} must be an iterable of batches, e.g. a DataLoader or a list of (x, y) tuples; "
                          f"got {got}")


@dataclass
class TrainResult:
    epochs_run: int
    resumed_from_epoch: int  # 0 = fresh start
    history: list[dict] = field(default_factory=list)  # one {"epoch", "loss", "lr", ...} per finished epoch


def _structure(model: nn.Module) -> list:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if cfg.optimizer is Optimizer.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, n_batches: int | None):
    if cfg.schedule is Schedule.CONSTANT:
        return None
    if n_batches is None:
        raise ConfigError(f"schedule={cfg.schedule.value!r} needs data with a length (a DataLoader or a list of "
                          "batches) to know the number of steps; use schedule='constant' for an open stream")
    total = cfg.epochs * n_batches
    if cfg.schedule is Schedule.COSINE:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    # one step more than batches: the last batch's step lands on the end of the cycle, not past it
    return torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total + 1, pct_start=0.15)


def _save_atomically(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def fit(model: nn.Module, data: Iterable, loss_fn: Callable[[nn.Module, tuple], torch.Tensor],
        config: TrainConfig = TrainConfig(), *,
        on_epoch_end: Callable[[int, nn.Module], dict] | None = None) -> TrainResult:
    """Train ``model`` in place. ``loss_fn(model, batch)`` returns the scalar loss of one batch;
    ``on_epoch_end(epoch, model)`` may return metrics that go into the history."""
    check_model(model)
    check_batches(data)
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a callable loss_fn(model, batch) -> scalar tensor, got "
                          f"{type(loss_fn).__name__}")
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a graphopt.TrainConfig, got {type(config).__name__}")
    try:
        n_batches = len(data)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    if n_batches == 0:
        raise ConfigError("training data is empty")
    with progress.shown(config.progress):
        return _train(model, data, loss_fn, config, on_epoch_end, n_batches)


def _train(model: nn.Module, data: Iterable, loss_fn: Callable[[nn.Module, tuple], torch.Tensor],
           config: TrainConfig, on_epoch_end: Callable[[int, nn.Module], dict] | None,
           n_batches: int | None) -> TrainResult:
    opt = _make_optimizer(model, config)
    sched = _make_scheduler(opt, config, n_batches)
    start, history = 0, []
    ckpt = config.checkpoint_dir / CHECKPOINT if config.checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["structure"] != _structure(model):
            raise ConfigError(f"checkpoint {ckpt} was written for a different model structure; "
                              "use a fresh checkpoint_dir or delete it")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        generator = getattr(data, "generator", None)  # a DataLoader's shuffling
        if state.get("data_rng") is not None and generator is not None:
            generator.set_state(state["data_rng"])
        start, history = state["epoch"], state["history"]
    for epoch in range(start, config.epochs):
        model.train()
        total, count = 0.0, 0
        bar = progress.bar(data, n_batches, f"epoch {epoch + 1}/{config.epochs}")
        for batch in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise ConfigError(f"loss became {loss.item()} in epoch {epoch + 1}; lower the learning rate")
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item()
            count += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total / count:.4f}")
        if count == 0:
            raise ConfigError("training data is empty")
        model.eval()
        record = {"epoch": epoch + 1, "loss": total / count, "lr": opt.param_groups[0]["lr"]}  # lr after the epoch
        if on_epoch_end is not None:
            record.update(on_epoch_end(epoch + 1, model) or {})
        history.append(record)
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            generator = getattr(data, "generator", None)
            data_rng = generator.get_state() if generator is not None else None
            _save_atomically({"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict() if sched is not None else None, "epoch": epoch + 1,
                              "history": history, "structure": _structure(model), "rng": torch.get_rng_state(),
                              "data_rng": data_rng}, ckpt)
    model.eval()
    return TrainResult(config.epochs - start, start, history)


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable) -> float:
    """Top-1 accuracy of ``model`` (eval mode) over batches ``(x, y)``."""
    check_model(model)
    check_batches(data)
    was_training = model.training
    model.eval()
    correct = seen = 0
    try:
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ConfigError(f"evaluate needs (x, y) batches (inputs, class labels), got {type(batch).__name__}")
            x, y = batch
            correct += (model(x).argmax(1) == y).sum().item()
            seen += y.numel()
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError("evaluation data is empty")
    return correct / seen
