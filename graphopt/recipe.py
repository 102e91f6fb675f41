"""Compression recipes: prune in steps → fine-tune (optionally distilled) → quantize → compile,
with a stop criterion, one record per step, and the best model that meets the floor kept.

    result = graphopt.optimize(model, train_data, val_data, target="arm",
                               recipe=Recipe(prune=PruneStage(steps=3), quantize=QuantStage(),
                                             distill=True, stop=Stop(min_accuracy=0.89, max_macs=0.3)))
    result.model, result.compiled, result.report

The budget (``Stop.max_macs`` / ``max_params``, fractions of the original) drives the pruning
steps; ``Stop.min_accuracy`` is the floor: a pruning step that falls below it is discarded and
pruning stops; a quantized model below it is not used (the float model is compiled instead, and
the report says so). ``Stop.max_latency_ms`` (host) or ``max_instructions`` (emulated targets)
ends pruning once the compiled model is fast enough. QAT of binary weights (``QuantStage(weights=1,
activations=1)``: XNOR, as `graphopt.binarize`) is distilled from the original model unless
``QuantStage(distill=False)``; 4- and 2-bit weights get MSE-fitted per-channel clipping.
Refuses: a recipe with nothing to do, budgets outside (0, 1), empty data, binary weights without
QAT epochs.
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from graphopt.config import as_enum
from graphopt.distillation import DistillationLoss, distill
from graphopt.errors import ConfigError
from graphopt.passes.analysis import cost as graph_cost
from graphopt.passes.capture import capture, eval_mode
from graphopt.progress import LOG, shown
from graphopt.training import TrainConfig, evaluate, fit

if TYPE_CHECKING:
    from graphopt.compiled import CompiledModel


@dataclass(frozen=True)
class PruneStage:
    steps: int = 3
    criterion: str = "l1"
    epochs_per_step: int = 1  # fine-tuning after every pruning step

    def __post_init__(self):
        if self.steps < 1 or self.epochs_per_step < 0:
            raise ConfigError("PruneStage needs steps >= 1 and epochs_per_step >= 0")


@dataclass(frozen=True)
class QuantStage:
    weights: int = 8
    activations: int | None = 8  # 1: binary activations (with weights=1: XNOR, as graphopt.binarize)
    qat_epochs: int = 0  # 0: post-training quantization
    calibration_batches: int = 8
    distill: bool | None = None  # QAT against the original model; None: Recipe.distill, always for binary weights

    def __post_init__(self):
        from graphopt.quantization import LayerQuant

        LayerQuant(self.weights, self.activations)  # the bit widths QuantScheme accepts, checked now
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (self.qat_epochs, self.calibration_batches)):
            raise ConfigError("QuantStage.qat_epochs and calibration_batches must be ints")
        if self.qat_epochs < 0 or self.calibration_batches < 1:
            raise ConfigError("QuantStage needs qat_epochs >= 0 and calibration_batches >= 1")
        if self.weights == 1 and self.qat_epochs == 0:
            raise ConfigError("binary weights need training: give QuantStage(weights=1, qat_epochs=...) (>= 1)")
        if self.distill is not None and not isinstance(self.distill, bool):
            raise ConfigError(f"QuantStage.distill={self.distill!r} must be True, False or None")

    def distilled(self, recipe_distill: bool) -> bool:
        """Whether QAT trains against the original model: binary networks do by default."""
        return self.distill if self.distill is not None else (recipe_distill or self.weights == 1)


@dataclass(frozen=True)
class Stop:
    min_accuracy: float | None = None
    max_macs: float | None = None  # fraction of the original MACs
    max_params: float | None = None  # fraction of the original parameters
    max_latency_ms: float | None = None  # host targets: median latency of the compiled model
    max_instructions: int | None = None  # emulated targets: instructions per inference (a proxy)

    def __post_init__(self):
        for name in ("max_macs", "max_params"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                raise ConfigError(f"Stop.{name}={v} must be a fraction in (0, 1) of the original")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise ConfigError(f"Stop.min_accuracy={self.min_accuracy} must be in [0, 1]")
        if self.max_macs is not None and self.max_params is not None:
            raise ConfigError("give one pruning budget: Stop.max_macs or Stop.max_params")


@dataclass(frozen=True)
class Recipe:
    prune: PruneStage | None = None
    quantize: QuantStage | None = None
    distill: bool = False  # fine-tune / QAT distilled from the original model
    distill_loss: DistillationLoss = DistillationLoss(alpha=0.5, beta=0.5, temperature=4.0)
    stop: Stop = Stop()
    train: TrainConfig = TrainConfig(epochs=1, lr=1e-3)

    def __post_init__(self):
        if self.prune is None and self.quantize is None:
            raise ConfigError("the recipe does nothing: give prune=PruneStage(...) and/or quantize=QuantStage(...)")
        if self.prune is not None and self.stop.max_macs is None and self.stop.max_params is None \
                and self.stop.max_latency_ms is None and self.stop.max_instructions is None:
            raise ConfigError("pruning needs a budget: Stop(max_macs=...), max_params, max_latency_ms or "
                              "max_instructions")

    @staticmethod
    def from_dict(d: dict) -> Recipe:
        """Build from a plain dict (e.g. a parsed recipe.toml with [prune], [quantize], [stop], [train])."""
        known = {"prune", "quantize", "stop", "train", "distill", "distill_loss"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown recipe sections {sorted(unknown)}; known: {sorted(known)}")
        try:
            return Recipe(prune=PruneStage(**d["prune"]) if "prune" in d else None,
                          quantize=QuantStage(**d["quantize"]) if "quantize" in d else None,
                          distill=bool(d.get("distill", False)),
                          distill_loss=DistillationLoss(**d.get("distill_loss", {})),
                          stop=Stop(**d.get("stop", {})), train=TrainConfig(**d.get("train", {})))
        except TypeError as exc:
            raise ConfigError(f"bad recipe field: {exc}") from None


@dataclass
class StepRecord:
    step: str
    accuracy: float
    macs: int
    params: int
    weight_bits: int = 32
    latency: float | None = None  # ms (host) or instructions per inference (emulated)
    kept: bool = True
    note: str = ""

    @property
    def weight_bytes(self) -> int:
        return self.params * self.weight_bits // 8


@dataclass
class OptimizeReport:
    target: str
    steps: list[StepRecord] = field(default_factory=list)
    latency_unit: str = ""
    plot: str | None = None

    def to_dict(self) -> dict:
        return {"target": self.target, "latency_unit": self.latency_unit, "plot": self.plot,
                "steps": [{**asdict(s), "weight_bytes": s.weight_bytes} for s in self.steps]}

    def to_markdown(self) -> str:
        base = self.steps[0]
        lines = ["| step | accuracy | MACs | × fewer | params | weight bytes | "
                 f"latency ({self.latency_unit or '–'}) | kept | note |", "|---|---|---|---|---|---|---|---|---|"]
        for s in self.steps:
            lat = "–" if s.latency is None else f"{s.latency:.4g}"
            lines.append(f"| {s.step} | {s.accuracy:.4f} | {s.macs:,} | {base.macs / max(s.macs, 1):.2f} | "
                         f"{s.params:,} | {s.weight_bytes:,} | {lat} | {'yes' if s.kept else 'no'} | {s.note} |")
        return "\n".join(lines) + "\n"


@dataclass
class OptimizeResult:
    model: nn.Module  # the best model meeting the floor (quantized QDQ module if quantization kept)
    compiled: CompiledModel  # of `model`
    report: OptimizeReport


def _first_batch(data: Iterable) -> tuple:
    for batch in data:
        return batch
    raise ConfigError("training data is empty")


def _cost(model: nn.Module, x: tuple) -> tuple[int, int]:
    with eval_mode(model):
        c = graph_cost(capture(model, x).graph_module, x)
    return c.macs, c.params


def _latency(cm, x: tuple) -> float:
    if cm.target.is_emulated:
        return float(cm.report.instructions_per_inference or 0)
    for _ in range(3):
        cm(*x)
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        cm(*x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def optimize(model: nn.Module, train_data: Iterable, val_data: Iterable, target: str = "arm", *,
             recipe: Recipe, out_dir: str | Path | None = None, progress: bool = True) -> OptimizeResult:
    """Run ``recipe`` on a copy of ``model``; see the module docstring. ``train_data``/``val_data``
    yield ``(x, y)`` batches; the first training batch's inputs are the example inputs. ``progress``
    logs every step (`graphopt.progress`) and shows training bars."""
    with shown(progress):
        return _optimize(model, train_data, val_data, target, recipe=recipe, out_dir=out_dir, progress=progress)


def _optimize(model: nn.Module, train_data: Iterable, val_data: Iterable, target: str, *,
              recipe: Recipe, out_dir: str | Path | None, progress: bool) -> OptimizeResult:
    from graphopt.api import compile
    from graphopt.passes.capture import check_model
    from graphopt.pruning import Criterion, PruneConfig, prune_iteratively
    from graphopt.quantization import Observer, QuantScheme, convert, prepare_qat, quantize
    from graphopt.targets import get_target
    from graphopt.training import check_batches

    spec = get_target(target)
    check_model(model)
    check_batches(train_data, "train_data")
    check_batches(val_data, "val_data")
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe must be a graphopt.Recipe (e.g. Recipe.from_dict(tomllib.load(f))), got "
                          f"{type(recipe).__name__}")
    x = (_first_batch(train_data)[0][:1],)
    teacher = copy.deepcopy(model).eval()
    stop, cfg = recipe.stop, recipe.train
    report = OptimizeReport(spec.name, latency_unit="instructions" if spec.is_emulated else "ms")
    say = LOG.getChild("optimize").info
    measure_latency = stop.max_latency_ms is not None or stop.max_instructions is not None

    def train(student: nn.Module, epochs: int, distilled: bool = recipe.distill) -> None:
        if epochs < 1:
            return
        c = TrainConfig(**{**asdict(cfg), "epochs": epochs, "progress": progress and cfg.progress})
        if distilled:
            distill(student, teacher, train_data, loss=recipe.distill_loss, config=c)
        else:
            fit(student, train_data, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), c)

    def record(name: str, m: nn.Module, bits: int = 32, note: str = "", kept: bool = True) -> StepRecord:
        macs, params = _cost(m, x)
        rec = StepRecord(name, evaluate(m, val_data), macs, params, bits, None, kept, note)
        if measure_latency and bits == 32:
            rec.latency = _latency(compile(m, x, spec, progress=False), x)
        report.steps.append(rec)
        say(f"{name}: accuracy {rec.accuracy:.4f}, MACs {macs:,}, params {params:,}"
            + (f", latency {rec.latency:.4g} {report.latency_unit}" if rec.latency is not None else ""))
        return rec

    base = record("original", teacher)
    best = copy.deepcopy(model).eval()
    floor = stop.min_accuracy

    if recipe.prune is not None:
        stage = recipe.prune
        budget: dict[str, Any] = {"target_macs": stop.max_macs} if stop.max_macs is not None else \
                 {"target_params": stop.max_params} if stop.max_params is not None else {"target_macs": 0.1}

        def fine_tune(candidate: nn.Module, step: int) -> float:
            train(candidate, stage.epochs_per_step)
            rec = record(f"prune {step}", candidate)
            if floor is not None and rec.accuracy < floor:
                rec.kept, rec.note = False, f"below the floor {floor:g}: discarded"
            elif _fast_enough(rec.latency, stop):
                rec.note = "latency budget met"
                raise _BudgetMet(candidate)
            return rec.accuracy

        try:
            config = PruneConfig(criterion=as_enum(Criterion, stage.criterion, "criterion"), **budget)
            best = prune_iteratively(best, x, config, steps=stage.steps, fine_tune=fine_tune, min_metric=floor,
                                     target=spec).eval()
        except _BudgetMet as met:
            best = met.model.eval()

    final = best
    if recipe.quantize is not None:
        q = recipe.quantize
        low_bit = q.weights in (2, 4)  # per-channel clipping fitted by MSE: int2 QAT loses ~3 points less
        scheme = QuantScheme(weights=q.weights, activations=q.activations,
                             weight_observer=Observer.MSE if low_bit else Observer.MINMAX)
        calib = [(b[0],) for _, b in zip(range(q.calibration_batches), train_data, strict=False)]
        if q.qat_epochs:
            qat = prepare_qat(best, x, scheme, calibration=calib)
            train(qat, q.qat_epochs, q.distilled(recipe.distill))
            qm = convert(qat)
        else:
            qm = quantize(best, x, calibration=calib, scheme=scheme)
        kind = "XNOR" if (q.weights, q.activations) == (1, 1) else f"int{q.weights}"
        rec = record(f"{kind} {'QAT' if q.qat_epochs else 'PTQ'}", qm, bits=q.weights)
        if floor is None or rec.accuracy >= floor:
            final = qm
        else:
            rec.kept, rec.note = False, f"below the floor {floor:g}: the float model is compiled instead"

    say(f"compiling the kept model for {spec.name}")
    compiled = compile(final, x, spec, progress=progress)
    if out_dir is not None:
        report.plot = str(write_outputs(report, Path(out_dir), base))
    return OptimizeResult(final, compiled, report)


class _BudgetMet(Exception):
    """Raised from the fine-tune callback to end pruning once the latency budget is met."""

    def __init__(self, model: nn.Module):
        super().__init__("latency budget met")
        self.model = model


def _fast_enough(latency: float | None, stop: Stop) -> bool:
    if latency is None:
        return False
    limit = stop.max_latency_ms if stop.max_latency_ms is not None else stop.max_instructions
    return limit is not None and latency <= limit


def write_outputs(report: OptimizeReport, out_dir: Path, base: StepRecord) -> Path:
    """``optimize.md`` (table), ``optimize.json`` and ``optimize.png`` (accuracy vs MACs and weight size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "optimize.md").write_text(report.to_markdown())
    (out_dir / "optimize.json").write_text(json.dumps(report.to_dict(), indent=2))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "macs", "MACs (M)"), (axes[1], "weight_bytes", "weight size (KiB)")):
        div = 1e6 if key == "macs" else 1024
        pts = [(getattr(s, key) / div, s.accuracy, s) for s in report.steps]
        ax.plot([p[0] for p in pts if p[2].kept], [p[1] for p in pts if p[2].kept], "o-", label="kept")
        ax.scatter([p[0] for p in pts if not p[2].kept], [p[1] for p in pts if not p[2].kept], c="red",
                   marker="x", label="discarded")
        for px, py, s in pts:
            ax.annotate(s.step, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(base.accuracy, color="gray", linestyle="--", linewidth=0.8, label="original")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"graphopt optimize → {report.target}")
    fig.tight_layout()
    path = out_dir / "optimize.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
