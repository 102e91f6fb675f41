"""Knowledge distillation (teacher → student) and teacher pseudo-labels, as the source notes define.

    L = α·H(y, σ(z_s)) + β·H(σ(z_t/τ), σ(z_s/τ))

H is cross-entropy, σ the softmax, τ the temperature. The notes' loss has no τ² factor; Hinton et
al. multiply the soft term by τ² so its gradients keep their size as τ grows — `t2_scaling=True`
does that. `SoftLoss.KL` uses KL(p_t ‖ p_s) = H(p_t, p_s) − H(p_t): the same gradients, a loss that
reaches 0 when the student matches. The teacher is frozen (eval mode, forward under no_grad, its
modules' training flags restored afterwards); an ensemble
teacher averages its members' logits. Refuses: τ ≤ 0, negative or all-zero weights, teacher and
student outputs of different shapes, empty data.
"""
from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from graphopt.config import as_enum
from graphopt.errors import ConfigError, InputError
from graphopt.training import TrainConfig, TrainResult, check_batches, fit


class SoftLoss(str, enum.Enum):
    CE = "ce"
    KL = "kl"


@dataclass(frozen=True)
class DistillationLoss:
    alpha: float = 0.5  # weight of the hard-label term, at T = 1
    beta: float = 0.5  # weight of the soft teacher term, at T = temperature
    temperature: float = 4.0
    soft: SoftLoss = SoftLoss.CE
    t2_scaling: bool = False

    def __post_init__(self):
        object.__setattr__(self, "soft", as_enum(SoftLoss, self.soft, "soft"))
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise ConfigError(f"alpha and beta must be >= 0 and not both 0, got alpha={self.alpha}, beta={self.beta}")

    def soft_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """H(σ(z_t/τ), σ(z_s/τ)) (or KL), averaged over the batch; τ²-scaled if asked."""
        if student_logits.shape != teacher_logits.shape:
            raise InputError(f"teacher output {tuple(teacher_logits.shape)} and student output "
                             f"{tuple(student_logits.shape)} differ; they must have the same classes")
        t = self.temperature
        p_t = F.softmax(teacher_logits.detach() / t, dim=-1)
        log_p_s = F.log_softmax(student_logits / t, dim=-1)
        term = -(p_t * log_p_s).sum(-1)
        if self.soft is SoftLoss.KL:
            term = term + (p_t * torch.log(p_t.clamp_min(1e-30))).sum(-1)
        return term.mean() * (t * t if self.t2_scaling else 1.0)

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor | None) -> torch.Tensor:
        """The full loss; with ``targets=None`` (unlabeled data) only the soft term, weighted by β."""
        loss = self.beta * self.soft_term(student_logits, teacher_logits)
        if targets is not None and self.alpha:
            loss = loss + self.alpha * F.cross_entropy(student_logits, targets)
        return loss


class Ensemble(nn.Module):
    """Averages the logits of several frozen teachers."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ConfigError("an ensemble teacher needs at least one model")
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(0)


@contextlib.contextmanager
def _frozen_teacher(teacher: nn.Module | Sequence[nn.Module]):
    """The teacher in eval mode for the duration; its forward runs under no_grad, so it never trains.
    The caller's modules get their training flags back afterwards (nothing else is changed)."""
    t = teacher if isinstance(teacher, nn.Module) else Ensemble(list(teacher))
    modes = {m: m.training for m in t.modules()}
    t.eval()
    try:
        yield t
    finally:
        for m, training in modes.items():
            m.training = training


def _check_teacher(teacher) -> None:
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if not teachers or not all(isinstance(t, nn.Module) for t in teachers):
        raise ConfigError(f"teacher must be a torch.nn.Module or a non-empty list of them, got {teacher!r:.80}")


@torch.no_grad()
def pseudo_label(teacher: nn.Module | Sequence[nn.Module], unlabeled: Iterable, *, hard: bool = True,
                 threshold: float = 0.0, temperature: float = 1.0) -> TensorDataset:
    """Label ``unlabeled`` (batches of inputs, or ``(x, _)`` pairs) with the teacher.

    hard=True gives class indices; hard=False gives soft probability vectors at ``temperature``.
    Samples whose top teacher probability is below ``threshold`` are dropped.
    """
    _check_teacher(teacher)
    check_batches(unlabeled, "unlabeled")
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"threshold must be in [0, 1), got {threshold}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    xs, ys = [], []
    with _frozen_teacher(teacher) as t:
        for batch in unlabeled:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            probs = F.softmax(t(x) / temperature, dim=-1)
            keep = probs.max(-1).values >= threshold
            xs.append(x[keep])
            ys.append(probs.argmax(-1)[keep] if hard else probs[keep])
    if not xs:
        raise ConfigError("unlabeled data is empty")
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def distill(student: nn.Module, teacher: nn.Module | Sequence[nn.Module], train_data: Iterable, *,
            loss: DistillationLoss = DistillationLoss(), config: TrainConfig = TrainConfig(),
            extra_inputs: Iterable | None = None, penalty=None) -> TrainResult:
    """Train ``student`` in place on ``train_data`` (batches ``(x, y)``) against the frozen ``teacher``.

    extra_inputs: unlabeled input batches; they join training with the soft term only (the
                  teacher's knowledge is the only label they have).
    penalty:      optional ``penalty(student) -> tensor`` added to every batch's loss (e.g.
                  `graphopt.filter_norm_penalty`).
    """
    from graphopt.passes.capture import check_model

    check_model(student, "student")
    _check_teacher(teacher)
    check_batches(train_data, "train_data")
    if extra_inputs is not None:
        check_batches(extra_inputs, "extra_inputs")
    batches = _LabeledThenUnlabeled(train_data, extra_inputs or ())
    with _frozen_teacher(teacher) as t:
        def step(model: nn.Module, batch) -> torch.Tensor:
            x, y = batch
            with torch.no_grad():
                z_t = t(x)
            value = loss(model(x), z_t, y)
            return value + penalty(model) if penalty is not None else value

        return fit(student, batches, step, config)


class _LabeledThenUnlabeled:
    """Each epoch: the labeled batches, then the unlabeled ones as ``(x, None)``."""

    def __init__(self, labeled: Iterable, unlabeled: Iterable):
        self.labeled, self.unlabeled = labeled, unlabeled

    def __len__(self) -> int:
        return len(self.labeled) + len(self.unlabeled)  # type: ignore[arg-type]

    def __iter__(self):
        yield from self.labeled
        for b in self.unlabeled:
            yield (b[0] if isinstance(b, (tuple, list)) else b), None


def loader(dataset, batch_size: int = 128, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A deterministic DataLoader (seeded shuffling) for the training helpers."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))
