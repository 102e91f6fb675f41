"""Compression building blocks (seconds each): an XNOR network with real-valued shortcuts compiled to
the popcount kernels bit-exactly, 8-bit graph inputs under 4-bit activations, sensitivity-chosen
mixed precision, cached teacher logits, the distillation search, LR schedules, binary recipes.
The accuracy claims on real data are `test_compression_bench.py` (slow)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import graphopt
from graphopt import qref
from graphopt.distillation import DistillationLoss, SoftLoss, distill, loader, search_distillation, teacher_logits
from graphopt.errors import ConfigError, QuantizationError
from graphopt.passes import analysis
from graphopt.precision import Sensitivity, layer_sensitivity, mixed_precision
from graphopt.quantization import FakeQuantize, QuantScheme
from graphopt.recipe import QuantStage
from graphopt.training import Schedule, TrainConfig, fit

g = torch.ops.graphopt


class BiRealBlock(nn.Module):
    """Bi-Real style: x + BN(conv(hardtanh(x))), written with an in-place add as people do."""

    def __init__(self, c: int, stride_pool: bool = False):
        super().__init__()
        self.conv, self.bn, self.pool = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), stride_pool

    def forward(self, x):
        out = self.bn(self.conv(F.hardtanh(x)))
        out += x
        return F.max_pool2d(out, 2) if self.pool else out


class XnorNet(nn.Module):
    """8-bit stem and head; three binary 3×3 convs (odd width 20: channel words padded) with shortcuts."""

    def __init__(self, c: int = 20):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.blocks = nn.Sequential(BiRealBlock(c, stride_pool=True), BiRealBlock(c), BiRealBlock(c))
        self.head = nn.Linear(c * 5 * 5, 10)

    def forward(self, x):
        x = self.blocks(F.max_pool2d(self.stem(x), 2))
        return self.head(F.hardtanh(x).flatten(1))


def _ready(model: nn.Module) -> nn.Module:
    """Real BN statistics (a few train-mode passes), then eval."""
    model.train()
    with torch.no_grad():
        for i in range(4):
            model(torch.randn(16, 1, 20, 20, generator=torch.Generator().manual_seed(i)))
    return model.eval()


X = torch.randn(1, 1, 20, 20, generator=torch.Generator().manual_seed(7))


def test_xnor_network_compiles_to_popcount_kernels_bit_exact():
    torch.manual_seed(0)
    model = _ready(XnorNet())
    calib = [torch.randn(8, 1, 20, 20, generator=torch.Generator().manual_seed(9))]
    bm = graphopt.binarize(model, (X,), binary_activations=True, calibration=calib)
    opt = torch.optim.Adam(bm.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(bm(calib[0]), torch.arange(8) % 10).backward()
        opt.step()
    qm = graphopt.convert(bm)
    ig = graphopt.to_integer(qm, (X,))
    convs = [n for n in ig.graph.nodes if n.target in (g.qconv2d.default, g.qlinear.default)]
    # first and last layers 8-bit (int8 weights, int8 input); the three middle convs: sign(x) ⊛ sign(W)
    binary = [n for n in convs if n.args[0].target is g.qsign.default and n.args[2].target is g.unpack_bits.default
              and n.args[2].args[1] == 1]
    assert len(convs) == 5 and binary == convs[1:4]
    assert convs[0].args[2].op == "get_attr" and convs[-1].args[2].op == "get_attr"
    # each binary conv's shortcut stays real: its requantized output is added to the 8-bit stream
    assert all(any(u.target is g.qadd.default for r in n.users for u in r.users) for n in binary)
    assert not analysis.float_ops_in_quantized(ig, (X,))

    cm = graphopt.compile(qm, (X,), "host", progress=False)
    # graphopt's own binary kernels: 3 XNOR-popcount convs + 2 sign-packing kernels (10×10 and 5×5 inputs;
    # blocks 2 and 3 share one). Without them the layers would run as int8 convs and this count is 0.
    assert cm.report.lowering["scheduled"].get("tuned") == 5
    for seed in range(3):
        x = torch.randn(1, 1, 20, 20, generator=torch.Generator().manual_seed(100 + seed)) * (1 + seed)
        want = ig(x)
        assert torch.equal(cm(x), want)
        assert np.array_equal(qref.run(ig, (x,))[0], want.numpy())  # numpy XNOR-popcount reference


def test_sign_gradient_is_clipped_straight_through():
    bm = graphopt.binarize(_ready(XnorNet()), (X,), binary_activations=True)
    signs = [m for m in bm.modules() if isinstance(m, FakeQuantize) and m.sign]
    assert len(signs) == 3
    x = torch.linspace(-2, 2, 9, requires_grad=True)
    signs[0](x).sum().backward()
    scale = float(signs[0].qparams()[0])
    assert torch.equal(x.grad, torch.where(x.abs() <= 1, scale, 0.0))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.fc(torch.relu(self.c2(y)).flatten(1))


def _toy(n: int, seed: int) -> TensorDataset:
    """Three classes: a bright blob in the left, middle or right third of an 8×8 image, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 1, 8, 8, generator=gen) * 0.8
    for i in range(3):
        x[y == i, :, 2:6, i * 3:i * 3 + 2] += 1.5
    return TensorDataset(x, y)


def _weight_bits(qat: nn.Module) -> list[int]:
    return [m.bits for m in qat.modules() if isinstance(m, FakeQuantize) and m.weight]


def test_graph_inputs_stay_8bit_under_4bit_activations():
    x = torch.randn(2, 1, 8, 8)
    for keep, want in ((True, 8), (False, 4)):
        qat = graphopt.prepare_qat(Small().eval(), (x,), QuantScheme(weights=4, activations=4,
                                                                       keep_first_last_8bit=keep))
        first = next(n for n in qat.graph.nodes if n.op == "call_module" and n.args[0].op == "placeholder")
        assert qat.get_submodule(first.target).bits == want
        inner = [m.bits for m in qat.modules() if isinstance(m, FakeQuantize) and not m.weight][1:]
        assert 4 in inner


def test_mixed_precision_greedy_choice_on_known_sensitivities():
    base = QuantScheme()
    sens = Sensitivity(base, 0.9, sizes={"a": 1000, "b": 1000, "c": 100}, base_bits={"a": 8, "b": 8, "c": 8},
                       activations={"a": 8, "b": 8, "c": 8},
                       drops={"a": {4: 0.001, 2: 0.05}, "b": {4: 0.002, 2: 0.003}, "c": {4: 0.2, 2: 0.3}})
    # bytes at 8 bits: 2100. Accuracy lost per byte saved: a→4 (0.001/500 B), then b→4 (0.002/500 B), then
    # b→2 (0.001 more /250 B); c is small and sensitive, so it goes last
    assert mixed_precision(sens, 2100).bits == {"a": 8, "b": 8, "c": 8}
    assert mixed_precision(sens, 1600).bits == {"a": 4, "b": 8, "c": 8}
    assert mixed_precision(sens, 1100).bits == {"a": 4, "b": 4, "c": 8}
    plan = mixed_precision(sens, 850)
    assert plan.bits == {"a": 4, "b": 2, "c": 8} and plan.weight_bytes == 850
    assert plan.predicted_drop == pytest.approx(0.001 + 0.003)
    assert set(plan.scheme.overrides) == {"a", "b", "c"} and plan.scheme.overrides["b"].weights == 2
    with pytest.raises(QuantizationError, match="below 525 B"):
        mixed_precision(sens, 400)


def test_layer_sensitivity_measures_each_layer_alone_and_the_plan_builds():
    torch.manual_seed(0)
    model = Small()
    fit(model, loader(_toy(512, 0), 64), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        TrainConfig(epochs=3, lr=1e-2, progress=False))
    x, cal, val = _toy(2, 5).tensors[0], [_toy(128, 1).tensors[0]], loader(_toy(256, 2), 256, shuffle=False)
    sens = layer_sensitivity(model.eval(), (x,), cal, val, bits=(4, 2))
    assert sens.sizes == {"c1": 72, "c2": 576, "fc": 384} and sens.base_bits == {"c1": 8, "c2": 8, "fc": 8}
    direct = graphopt.evaluate(graphopt.quantize(model, (x,), cal, QuantScheme(
        overrides={"c2": graphopt.LayerQuant(2, 8)})), val)
    assert sens.drops["c2"][2] == pytest.approx(sens.accuracy - direct)
    plan = mixed_precision(sens, 600)
    assert plan.weight_bytes <= 600
    qat = graphopt.prepare_qat(model, (x,), plan.scheme, calibration=cal)
    assert _weight_bits(qat) == [plan.bits["c1"], plan.bits["c2"], plan.bits["fc"]]


def test_cached_teacher_logits_train_exactly_like_running_the_teacher():
    torch.manual_seed(0)
    teacher, student = Small().eval(), Small()
    data = _toy(256, 3)
    loss = DistillationLoss(alpha=0.3, beta=0.7, temperature=3.0, t2_scaling=True)
    cfg = TrainConfig(epochs=2, lr=1e-2, progress=False)
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    distill(a, teacher, loader(data, 32, seed=1), loss=loss, config=cfg)
    cached = teacher_logits(teacher, data, batch_size=100)
    assert torch.equal(cached.tensors[2], teacher(data.tensors[0]).detach())
    distill(b, None, loader(cached, 32, seed=1), loss=loss, config=cfg)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"logits \(x, y, z_t\) from graphopt.distill.teacher_logits"):
        distill(copy.deepcopy(student), None, loader(data, 32), config=cfg)


def test_distillation_search_reports_the_scratch_baseline_and_refuses_a_useless_teacher():
    torch.manual_seed(0)
    train, val = _toy(512, 10), loader(_toy(300, 11), 300, shuffle=False)
    teacher = Small()
    fit(teacher, loader(train, 64), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        TrainConfig(epochs=4, lr=1e-2, progress=False))
    student = Small()
    cfg = TrainConfig(epochs=1, lr=1e-2, schedule=Schedule.COSINE, progress=False)
    grid = [DistillationLoss(alpha=0.5, beta=0.5, temperature=4.0, soft=SoftLoss.KL, t2_scaling=True)]
    found = search_distillation(student, teacher.eval(), loader(train, 64, seed=3), val, grid=grid, config=cfg)
    # the scratch baseline is exactly the student trained on labels from the same weights and batch order
    scratch = copy.deepcopy(student)
    fit(scratch, loader(train, 64, seed=3), lambda m, b: F.cross_entropy(m(b[0]), b[1]), cfg)
    assert found.scratch_accuracy == graphopt.evaluate(scratch, val)
    assert found.accuracy == max([found.scratch_accuracy] + [a for _, a in found.trials])
    assert found.beats_scratch == (found.loss is not None) == (found.accuracy > found.scratch_accuracy)
    # a teacher whose logits are noise, weighted alone (α = 0), cannot beat the labels
    noise = TensorDataset(*train.tensors, torch.randn(len(train), 3, generator=torch.Generator().manual_seed(4)) * 5)
    useless = search_distillation(student, None, loader(noise, 64, seed=3), val, config=cfg,
                                  grid=[DistillationLoss(alpha=0.0, beta=1.0, temperature=1.0)])
    assert useless.loss is None and not useless.beats_scratch and useless.accuracy == useless.scratch_accuracy
    assert useless.to_dict()["chosen"] is None and len(useless.to_dict()["trials"]) == 1


def test_lr_schedules_step_per_batch_and_resume_exactly(tmp_path):
    step = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    lrs = {}
    for schedule in Schedule:
        torch.manual_seed(0)
        result = fit(Small(), loader(_toy(64, 6), 16), step,
                     TrainConfig(epochs=4, lr=0.01, schedule=schedule, progress=False))
        lrs[schedule] = [h["lr"] for h in result.history]  # after each epoch of 4 batches
    assert lrs[Schedule.CONSTANT] == [0.01] * 4
    assert lrs[Schedule.COSINE] == pytest.approx([0.01 * (1 + np.cos(np.pi * e / 4)) / 2 for e in (1, 2, 3, 4)],
                                                 abs=1e-12)
    one_cycle = lrs[Schedule.ONE_CYCLE]  # 15 % warm-up (within epoch 1), then cosine to ~0
    assert one_cycle[0] > one_cycle[1] > one_cycle[2] > one_cycle[3] and one_cycle[0] > 0.009 and one_cycle[3] < 1e-5
    # interrupted in epoch 3 and resumed: the schedule continues where it stopped, weights are exact
    torch.manual_seed(0)
    straight = Small()
    init = copy.deepcopy(straight.state_dict())
    cfg = TrainConfig(epochs=4, lr=0.01, schedule=Schedule.ONE_CYCLE, progress=False)
    fit(straight, loader(_toy(64, 6), 16), step, cfg)
    calls = {"n": 0}

    def interrupt(m, b):
        calls["n"] += 1
        if calls["n"] > 9:
            raise KeyboardInterrupt
        return step(m, b)

    resumed = Small()
    resumed.load_state_dict(init)
    ckpt = TrainConfig(epochs=4, lr=0.01, schedule=Schedule.ONE_CYCLE, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        fit(resumed, loader(_toy(64, 6), 16), interrupt, ckpt)
    again = Small()
    result = fit(again, loader(_toy(64, 6), 16), step, ckpt)
    assert result.resumed_from_epoch == 2 and [h["lr"] for h in result.history] == one_cycle
    for a, b in zip(again.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="length"):
        fit(Small(), iter(list(loader(_toy(64, 6), 16))), step, TrainConfig(schedule=Schedule.COSINE, progress=False))


def test_binary_quant_stage_needs_training_and_distills_by_default():
    with pytest.raises(ConfigError, match="binary weights need training"):
        QuantStage(weights=1, activations=1)
    xnor = QuantStage(weights=1, activations=1, qat_epochs=2)
    assert xnor.distilled(False) and not QuantStage(weights=1, qat_epochs=1, distill=False).distilled(True)
    assert not QuantStage(weights=4, qat_epochs=1).distilled(False) and QuantStage(weights=4).distilled(True)


def test_scheme_with_overrides_survives_quantize_and_copies():
    """`convert` deep-copies the prepared module and its scheme; a frozen overrides dict used to refuse that."""
    x = torch.randn(2, 1, 8, 8)
    scheme = QuantScheme(overrides={"c2": graphopt.LayerQuant(2, 8)})
    qm = graphopt.quantize(Small().eval(), (x,), [x], scheme)
    ig = graphopt.to_integer(qm, (x,))
    assert [n.args[2].args[1] for n in ig.graph.nodes if n.target is g.qconv2d.default
            and n.args[2].op == "call_function"] == [2]
    assert copy.deepcopy(scheme) == scheme and copy.deepcopy(scheme).overrides["c2"].weights == 2


@pytest.mark.parametrize("make", [
    lambda m, x: graphopt.prepare_qat(m, (x,), QuantScheme(weights=4)),
    lambda m, x: graphopt.binarize(m, (x,), binary_activations=True)])
def test_training_a_qat_module_leaves_the_callers_model_alone(make):
    """The capture shares the parameters of layers without batch norm (here all three) with the model."""
    torch.manual_seed(0)
    model, x = Small().eval(), torch.randn(4, 1, 8, 8)
    before = copy.deepcopy(model.state_dict())
    qat = make(model, x)
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    F.cross_entropy(qat(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert graphopt.convert(qat) is not None  # and the QAT module did train
