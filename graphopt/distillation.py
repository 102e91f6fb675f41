"""Knowledge distillation (teacher → student) and teacher pseudo-labels, as the source notes define.

    L = α·H(y, σ(z_s)) + β·H(σ(z_t/τ), σ(z_s/τ))

H is cross-entropy, σ the softmax, τ the temperature. The notes' loss has no τ² factor; Hinton et
al. multiply the soft term by τ² so its gradients keep their size as τ grows — `t2_scaling=True`
does that. `SoftLoss.KL` uses KL(p_t ‖ p_s) = H(p_t, p_s) − H(p_t): the same gradients, a loss that
reaches 0 when the student matches. The teacher is frozen (eval mode, forward under no_grad, its
modules' training flags restored afterwards); an ensemble
teacher averages its members' logits. Refuses: τ ≤ 0, negative or all-zero weights, teacher and
student outputs of different shapes, empty data.

Whether distillation helps depends on α, β and τ: `search_distillation` trains the student once per
setting of a small grid and once on hard labels alone (same initial weights, same batch order),
scores each on a validation split, and returns the best setting with the scratch baseline it had
to beat — and says so when none beat it.
"""
from __future__ import annotations

import contextlib
import copy
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from graphopt.config import as_enum
from graphopt.errors import ConfigError, InputError
from graphopt.training import Schedule, TrainConfig, TrainResult, check_batches, evaluate, fit


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


def distill(student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None, train_data: Iterable, *,
            loss: DistillationLoss = DistillationLoss(), config: TrainConfig = TrainConfig(),
            extra_inputs: Iterable | None = None, penalty=None) -> TrainResult:
    """Train ``student`` in place on ``train_data`` (batches ``(x, y)``) against the frozen ``teacher``.

    Batches ``(x, y, z_t)`` carry the teacher's logits (`teacher_logits`): the teacher is not run on
    them, and may then be None.
    extra_inputs: unlabeled input batches; they join training with the soft term only (the
                  teacher's knowledge is the only label they have).
    penalty:      optional ``penalty(student) -> tensor`` added to every batch's loss (e.g.
                  `graphopt.filter_norm_penalty`).
    """
    from graphopt.passes.capture import check_model

    check_model(student, "student")
    if teacher is not None or extra_inputs is not None:
        _check_teacher(teacher)
    check_batches(train_data, "train_data")
    if extra_inputs is not None:
        check_batches(extra_inputs, "extra_inputs")
    batches = _LabeledThenUnlabeled(train_data, extra_inputs or ())
    with (_frozen_teacher(teacher) if teacher is not None else contextlib.nullcontext()) as t:
        def step(model: nn.Module, batch) -> torch.Tensor:
            x, y, *cached = batch
            if cached:
                z_t = cached[0]
            elif t is None:
                raise ConfigError("distill: teacher must be a torch.nn.Module, or None with batches that carry its "
                                  "logits (x, y, z_t) from graphopt.distill.teacher_logits(teacher, dataset); got "
                                  "teacher=None and (x, y) batches")
            else:
                with torch.no_grad():
                    z_t = t(x)
            value = loss(model(x), z_t, y)
            return value + penalty(model) if penalty is not None else value

        return fit(student, batches, step, config)


@torch.no_grad()
def teacher_logits(teacher: nn.Module | Sequence[nn.Module], dataset, *, batch_size: int = 1000) -> TensorDataset:
    """``dataset``'s ``(x, y)`` samples with the frozen teacher's logits as a third tensor. `distill`
    on these batches costs one teacher pass over the data in total instead of one per epoch; only
    valid while the inputs do not change between epochs (no random augmentation)."""
    _check_teacher(teacher)
    xs, ys, zs = [], [], []
    with _frozen_teacher(teacher) as t:
        for x, y, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            xs.append(x)
            ys.append(y)
            zs.append(t(x))
    if not xs:
        raise ConfigError("dataset is empty")
    return TensorDataset(torch.cat(xs), torch.cat(ys), torch.cat(zs))


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


# α ∈ {0.1, 0.5} (β = 1 − α) × τ ∈ {2, 4}, KL soft term with Hinton's τ² (soft gradients keep their size).
DISTILL_GRID = tuple(DistillationLoss(alpha=a, beta=1.0 - a, temperature=t, soft=SoftLoss.KL, t2_scaling=True)
                     for a in (0.1, 0.5) for t in (2.0, 4.0))


@dataclass
class DistillSearch:
    """What `search_distillation` measured: validation accuracy per setting and of the scratch student."""

    loss: DistillationLoss | None  # the best setting; None when no setting beat the scratch student
    accuracy: float  # validation accuracy of `model`
    scratch_accuracy: float  # the same student trained on hard labels alone
    trials: list[tuple[DistillationLoss, float]] = field(default_factory=list)
    model: nn.Module | None = None  # the best student (the scratch one when no setting beat it)

    @property
    def beats_scratch(self) -> bool:
        return self.loss is not None

    def to_dict(self) -> dict:
        def setting(loss: DistillationLoss) -> dict:
            return {"alpha": loss.alpha, "beta": loss.beta, "temperature": loss.temperature,
                    "soft": loss.soft.value, "t2_scaling": loss.t2_scaling}

        return {"chosen": setting(self.loss) if self.loss is not None else None, "accuracy": self.accuracy,
                "scratch_accuracy": self.scratch_accuracy,
                "trials": [{**setting(loss), "accuracy": acc} for loss, acc in self.trials]}


def search_distillation(student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None, train_data: Iterable,
                        val_data: Iterable, *, grid: Sequence[DistillationLoss] = DISTILL_GRID,
                        config: TrainConfig = TrainConfig(epochs=2, lr=2e-3, schedule=Schedule.ONE_CYCLE),
                        extra_inputs: Iterable | None = None) -> DistillSearch:
    """Choose α, β, τ for distilling ``teacher`` into ``student`` (left untouched; copies are trained).

    Every trial starts from ``student``'s weights and, when ``train_data`` is a DataLoader with a
    generator (`graphopt.distill.loader`), sees the batches in the same order; the scratch baseline
    trains with cross-entropy on the labels for the same epochs. ``val_data`` must be held out from
    ``train_data``. Batches may carry the teacher's logits (`teacher_logits`; ``teacher`` may then be
    None). Ties go to the scratch student: distillation has to earn its place.
    """
    from graphopt.passes.capture import check_model

    check_model(student, "student")
    if teacher is not None:
        _check_teacher(teacher)
    check_batches(train_data, "train_data")
    check_batches(val_data, "val_data")
    grid = list(grid)
    if not grid or not all(isinstance(g, DistillationLoss) for g in grid):
        raise ConfigError(f"grid must be a non-empty sequence of graphopt.DistillationLoss, got {grid!r:.80}")
    generator = getattr(train_data, "generator", None)
    order = generator.get_state() if generator is not None else None

    def trial(loss: DistillationLoss | None) -> tuple[nn.Module, float]:
        if generator is not None and order is not None:
            generator.set_state(order)
        model = copy.deepcopy(student)
        if loss is None:
            fit(model, train_data, lambda m, b: F.cross_entropy(m(b[0]), b[1]), config)
        else:
            distill(model, teacher, train_data, loss=loss, config=config, extra_inputs=extra_inputs)
        return model, evaluate(model, val_data)

    best_model, scratch = trial(None)
    best, best_acc, trials = None, scratch, []
    for loss in grid:
        model, acc = trial(loss)
        trials.append((loss, acc))
        if acc > best_acc:
            best, best_acc, best_model = loss, acc, model
    return DistillSearch(best, best_acc, scratch, trials, best_model)
