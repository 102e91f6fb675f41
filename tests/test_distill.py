"""Distillation loss against hand-computed values, frozen teacher, pseudo-labels, trainer resume."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from graphopt.distillation import (
    DistillationLoss,
    Ensemble,
    SoftLoss,
    distill,
    loader,
    pseudo_label,
)
from graphopt.errors import ConfigError, InputError
from graphopt.training import TrainConfig, evaluate, fit


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    s = sum(e)
    return [v / s for v in e]


def test_loss_matches_hand_computation_at_t1_and_tau():
    zs, zt, y = [1.0, 2.0, 0.5], [0.2, 3.0, -1.0], 1
    for tau in (1.0, 4.0):
        ps1 = _softmax(zs, 1.0)
        pt, ps = _softmax(zt, tau), _softmax(zs, tau)
        hard = -math.log(ps1[y])
        soft = -sum(a * math.log(b) for a, b in zip(pt, ps, strict=True))
        want = 0.3 * hard + 0.7 * soft
        loss = DistillationLoss(alpha=0.3, beta=0.7, temperature=tau)
        zs64, zt64 = torch.tensor([zs], dtype=torch.float64), torch.tensor([zt], dtype=torch.float64)
        got = loss(zs64, zt64, torch.tensor([y])).item()
        assert got == pytest.approx(want, rel=1e-6)
        kl = DistillationLoss(alpha=0.3, beta=0.7, temperature=tau, soft=SoftLoss.KL, t2_scaling=True)
        entropy = -sum(a * math.log(a) for a in pt)
        got_kl = kl(zs64, zt64, torch.tensor([y])).item()
        assert got_kl == pytest.approx(0.3 * hard + 0.7 * tau * tau * (soft - entropy), rel=1e-6)


def test_unlabeled_batches_use_only_the_soft_term():
    loss = DistillationLoss(alpha=0.9, beta=0.1, temperature=2.0)
    zs, zt = torch.randn(4, 5), torch.randn(4, 5)
    assert loss(zs, zt, None).item() == pytest.approx(0.1 * loss.soft_term(zs, zt).item())


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0), "temperature"), (dict(temperature=-1), "temperature"),
    (dict(alpha=-0.1), "alpha and beta"), (dict(alpha=0, beta=0), "not both 0"), (dict(soft="js"), "soft"),
])
def test_bad_loss_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DistillationLoss(**kwargs)


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="same classes"):
        DistillationLoss()(torch.randn(2, 10), torch.randn(2, 5), torch.tensor([0, 1]))


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorDataset(x, y)


def test_distill_trains_only_the_student_and_leaves_teacher_untouched():
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    fit(teacher, loader(_data()), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        TrainConfig(epochs=3, lr=1e-2, progress=False))
    teacher.zero_grad(set_to_none=True)
    teacher.train()  # distill must use it in eval mode and hand it back in train mode
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = nn.Linear(8, 2)
    s_before = student.weight.detach().clone()
    distill(student, teacher, loader(_data()), config=TrainConfig(epochs=15, lr=5e-2, progress=False),
            extra_inputs=[x for x, _ in loader(_data(seed=1))])
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training  # the caller's model, as it was
    assert not torch.equal(student.weight, s_before)
    assert evaluate(student, loader(_data(seed=2), shuffle=False)) > 0.8


def test_pseudo_labels_hard_soft_and_threshold():
    torch.manual_seed(0)
    teachers = [nn.Linear(8, 3), nn.Linear(8, 3)]
    xs = torch.randn(50, 8)
    ens = Ensemble(teachers)
    hard = pseudo_label(teachers, [xs[:25], xs[25:]])
    assert torch.equal(hard.tensors[1], ens(xs).argmax(1))
    soft = pseudo_label(teachers, [(xs, None)], hard=False, temperature=2.0)
    torch.testing.assert_close(soft.tensors[1], torch.softmax(ens(xs).detach() / 2.0, 1))
    confident = pseudo_label(teachers, [xs], threshold=0.6)
    keep = torch.softmax(ens(xs), 1).max(1).values >= 0.6
    assert len(confident) == int(keep.sum()) < 50
    with pytest.raises(ConfigError):
        pseudo_label(teachers, [])
    with pytest.raises(ConfigError):
        pseudo_label(teachers, [xs], threshold=1.0)


def test_trainer_resumes_after_interruption(tmp_path):
    data = loader(_data())
    step = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731

    torch.manual_seed(0)
    straight = nn.Linear(8, 2)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    fit(straight, loader(_data()), step, TrainConfig(epochs=3, lr=1e-2, progress=False))

    calls = {"n": 0}

    def interrupt_in_epoch_3(m, b):
        calls["n"] += 1
        if calls["n"] > 2 * len(data):
            raise KeyboardInterrupt
        return step(m, b)

    resumed = nn.Linear(8, 2)
    resumed.load_state_dict(init)
    cfg = TrainConfig(epochs=3, lr=1e-2, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        fit(resumed, loader(_data()), interrupt_in_epoch_3, cfg)
    again = nn.Linear(8, 2)
    result = fit(again, loader(_data()), step, cfg)
    assert result.resumed_from_epoch == 2 and result.epochs_run == 1 and len(result.history) == 3
    # the checkpoint carries the optimizer and the loader's shuffling state: resuming is exact
    torch.testing.assert_close(again.weight, straight.weight, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="different model structure"):
        fit(nn.Linear(8, 3), data, step, cfg)


def test_empty_data_and_bad_configs():
    with pytest.raises(ConfigError, match="empty"):
        fit(nn.Linear(2, 2), [], lambda m, b: m(b).sum(), TrainConfig(progress=False))
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
