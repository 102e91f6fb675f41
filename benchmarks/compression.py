"""Compression on real Fashion-MNIST (Debian's 60k/10k): every way graphopt shrinks a model, one table.

Per seed, an fp32 `FashionNet` is trained on the 60k training images and compressed from it:
int8 PTQ; QAT with int4 and int2 weights (MSE-fitted per-channel scales) and with int4 weights +
int4 activations; per-layer mixed precision chosen by sensitivity under a weight-size budget;
binary weights (8-bit activations); XNOR (binary weights and activations in every layer but the
first and last, `graphopt.binarize(..., binary_activations=True)`); structured pruning in two
phases of `graphopt.prune_iteratively` with distilled fine-tuning (to ≥ 3×, then on to ≥ 5× fewer
MACs) and the 5× model with int8 QAT; a small student trained from scratch and distilled. Every
QAT, binary and pruned model trains by distillation from its fp32 model (cached teacher logits) at
the α, β, τ that `graphopt.search_distillation` chose once, on seed 0, on a validation split held
out of the training images — the setting the student rows then use in every seed.

Columns: test accuracy (10k images), mean ± sample std over seeds and each seed — quantized models
are measured by running their compiled host artifact (graphopt's integer kernels, batches of
1000), whose outputs are checked bit for bit against the folded integer graph on 100 images in
every seed; MACs; weight bytes (conv/linear weights at their stored width, packed below 8 bits;
biases and scales not counted); host latency (x86 artifact, batch 1, median); aarch64
instructions per inference under QEMU (a deterministic proxy, not a speed), with every quantized
aarch64 artifact checked bit for bit against its integer graph on 2 images. Latency and
instructions come from seed 0's models.

    python benchmarks/compression.py                        # 3 seeds: table, JSON and plot in build/compression
    python benchmarks/compression.py --quick --no-arm       # the slow test's configuration

It sets one thread (torch and TVM); the full run takes ~40 min of one core.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

import graphopt
from graphopt.datasets import fashion_mnist
from graphopt.distillation import DistillationLoss, loader, search_distillation, teacher_logits
from graphopt.passes.analysis import analyze
from graphopt.passes.capture import capture
from graphopt.precision import layer_sensitivity, mixed_precision
from graphopt.quantization import Observer, QuantScheme
from graphopt.training import Schedule, TrainConfig, evaluate, fit


class Block(nn.Module):
    """x + BN(conv(hardtanh(x))): binarized, the conv's input is sign(x) (hardtanh's clip is the
    sign's straight-through window) and the BN before the next sign folds into the conv; the
    shortcut stays real-valued (8-bit)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(self.conv(F.hardtanh(x)))


class FashionNet(nn.Module):
    """Stem 3×3 conv (28×28) → pool → 1 block (14×14) → pool → 2 blocks (7×7) → linear."""

    def __init__(self, width: int = 32, blocks: tuple[int, int] = (1, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.stage1 = nn.Sequential(*[Block(width) for _ in range(blocks[0])])
        self.stage2 = nn.Sequential(*[Block(width) for _ in range(blocks[1])])
        self.fc = nn.Linear(width * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2)
        x = F.max_pool2d(self.stage1(x), 2)
        return self.fc(F.hardtanh(self.stage2(x)).flatten(1))


@dataclass(frozen=True)
class Config:
    seeds: int = 3
    width: int = 32
    student_width: int = 12
    fp32_epochs: int = 4
    qat_fraction: float = 0.5  # QAT runs on this fraction of the training images (one pass)
    binary_epochs: int = 1  # binary-weight and XNOR distillation
    prune_targets: tuple[float, float] = (0.30, 0.19)  # MACs kept by the "3×" and "5×" models
    prune_steps: int = 2  # geometric pruning steps per phase (fp32 → 3×, 3× → 5×)
    prune_step_fraction: float = 0.5  # distilled fine-tuning after each pruning step
    # distilled fine-tuning that ends each phase; 5 epochs left seed 0's 5× model 1.45 points under fp32, 10: 1.01
    prune_final_epochs: tuple[int, int] = (3, 10)
    student_epochs: int = 4  # at 2, distillation lost to the scratch student in seed 1 (by 0.03); at 4 it won
    val_size: int = 5000  # held out of the training images for the distillation search (seed 0)
    mixed_budget: float | None = 0.10  # mixed precision: weight bytes as a fraction of fp32 (None: no row)
    train_limit: int | None = None  # None: all 60k training images
    batch: int = 128
    latency_runs: int = 200
    arm_target: str | None = "arm-a55"


# The slow test's configuration: the same training wherever a threshold is close (fp32, pruning, the students:
# the 5× row is within 0.1 point of its bound and distillation wins by 0.15–0.6), QAT on a quarter of the images
# (those rows have points to spare), no mixed-precision row, no emulation.
QUICK = Config(qat_fraction=0.25, mixed_budget=None, latency_runs=20, arm_target=None)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _cost(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(MACs, conv/linear weight count) of a float model."""
    macs = analyze(capture(model.eval(), (x,)).graph_module, (x,)).macs
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return macs, weights


def _artifact_accuracy(qm: nn.Module, test: TensorDataset, check: int = 100) -> tuple[float, bool]:
    """Test accuracy of ``qm``'s compiled host artifact (the integer kernels; batches of 1000), and
    whether its outputs on the first ``check`` images equal the folded integer graph's bit for bit."""
    xs, ys = test.tensors
    cm = graphopt.compile(qm, (xs[:1000],), "host", progress=False)
    outs = [cm(xs[i:i + 1000]) for i in range(0, len(xs), 1000)]
    hits = sum(int((o.argmax(1) == ys[i * 1000:(i + 1) * 1000]).sum()) for i, o in enumerate(outs))
    exact = torch.equal(outs[0][:check], graphopt.to_integer(qm, (xs[:2],))(xs[:check]))
    return hits / len(xs), exact


@dataclass
class Row:
    key: str
    method: str
    note: str
    accuracies: list[float] = field(default_factory=list)
    macs: int = 0
    weight_bytes: int = 0
    latency_ms: float | None = None
    instructions: int | None = None
    bit_exact: str = ""

    @property
    def mean(self) -> float:
        return statistics.mean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


class Bench:
    def __init__(self, cfg: Config, progress: bool = False, log=print):
        self.cfg, self.progress, self.log = cfg, progress, log
        train = fashion_mnist("train", limit=cfg.train_limit)
        self.test = fashion_mnist("test")
        self.train = train
        self.x = self.test.tensors[0][:1]
        self.rows: dict[str, Row] = {}
        self.models: dict[str, nn.Module] = {}  # seed 0's models, compiled at the end
        self.quantized: set[str] = set()
        self.search = None
        self.timings: dict[str, float] = {}

    # ---- helpers
    def tc(self, epochs: int, lr: float, schedule: Schedule) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=lr, schedule=schedule, progress=self.progress)

    def data(self, seed: int, fraction: float = 1.0):
        """Training batches ``(x, y, fp32 logits)`` in a seeded order, on a seeded fraction of the images."""
        ds = self.cached
        if fraction < 1.0:
            idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1000 + seed))
            ds = Subset(ds, idx[:int(len(ds) * fraction)].tolist())
        return loader(ds, self.cfg.batch, seed=seed)

    def calibration(self) -> list[torch.Tensor]:
        xs = self.train.tensors[0]
        return [xs[i:i + 256] for i in range(0, 2048, 256)]

    def row(self, key: str, method: str, note: str) -> Row:
        return self.rows.setdefault(key, Row(key, method, note))

    def record(self, key: str, method: str, note: str, seed: int, model: nn.Module, *, quantized: bool,
               macs: int, weight_bytes: int) -> float:
        t0 = time.process_time()
        r = self.row(key, method, note)
        if quantized:
            with self.timed("compile + evaluate quantized"):
                acc, exact = _artifact_accuracy(model, self.test)
            r.bit_exact = ("host ✓" if exact and r.bit_exact != "host ✗" else "host ✗")
            if not exact:
                raise SystemExit(f"{method} (seed {seed}): the host artifact differs from its integer graph")
        else:
            acc = evaluate(model, loader(self.test, 1000, False))
        r.accuracies.append(100.0 * acc)
        r.macs, r.weight_bytes = macs, weight_bytes
        if seed == 0:
            self.models[key] = model
            if quantized:
                self.quantized.add(key)
        self.log(f"  seed {seed} {method}: {100 * acc:.2f}% (eval {time.process_time() - t0:.0f} s)")
        return acc

    def timed(self, name: str):
        bench = self

        class _T:
            def __enter__(self):
                self.t0 = time.process_time()

            def __exit__(self, *exc):
                bench.timings[name] = bench.timings.get(name, 0.0) + time.process_time() - self.t0

        return _T()

    # ---- one seed
    def train_fp32(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        fp32 = FashionNet(self.cfg.width)
        with self.timed("fp32"):
            fit(fp32, loader(self.train, self.cfg.batch, seed=seed), ce,
                self.tc(self.cfg.fp32_epochs, 3e-3, Schedule.ONE_CYCLE))
        with self.timed("teacher logits"):
            self.cached = teacher_logits(fp32, self.train)
        return fp32.eval()

    def run_seed(self, seed: int, fp32: nn.Module, loss: DistillationLoss) -> None:
        cfg, x = self.cfg, self.x
        macs, nweights = _cost(fp32, x)
        self.record("fp32", "fp32", f"{cfg.fp32_epochs} epochs", seed, fp32, quantized=False, macs=macs,
                    weight_bytes=4 * nweights)

        def packed(bits: list | int, model: nn.Module = fp32) -> int:  # weight bytes (first/last 8-bit)
            sizes = [m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            widths = bits if isinstance(bits, list) else [8] + [bits] * (len(sizes) - 2) + [8]
            return sum((n * b + 7) // 8 for n, b in zip(sizes, widths, strict=True))

        with self.timed("int8 PTQ"):
            qm = graphopt.quantize(fp32, (x,), self.calibration(), QuantScheme())
        self.record("int8", "int8 PTQ", "weights + activations, 2k calibration images", seed, qm, quantized=True,
                    macs=macs, weight_bytes=packed(8))

        def qat(key, method, scheme, bits, lr=3e-4, model=fp32, macs=macs):
            with self.timed(method):
                q = graphopt.prepare_qat(model, (x,), scheme, calibration=self.calibration())
                graphopt.distill(q, None, self.data(seed, cfg.qat_fraction), loss=loss,
                                 config=self.tc(1, lr, Schedule.COSINE))
                qm = graphopt.convert(q)
            self.record(key, method, f"distilled QAT, {cfg.qat_fraction:g} epoch", seed, qm, quantized=True,
                        macs=macs, weight_bytes=packed(bits, model))

        qat("w4", "int4 QAT (w4 a8)", QuantScheme(weights=4, weight_observer=Observer.MSE), 4)
        qat("w2", "int2 QAT (w2 a8)", QuantScheme(weights=2, weight_observer=Observer.MSE), 2)
        qat("w4a4", "int4 QAT (w4 a4)", QuantScheme(weights=4, activations=4, weight_observer=Observer.MSE,
                                                    observer=Observer.MSE, learnable_scales=True), 4)

        if cfg.mixed_budget is not None:
            self.mixed(seed, fp32, nweights, qat)
        for key, method, binary_act in (("w1", "binary weights (w1 a8)", False), ("xnor", "XNOR (w1 a1)", True)):
            with self.timed(method):
                b = graphopt.binarize(fp32, (x,), binary_activations=binary_act, calibration=self.calibration())
                graphopt.distill(b, None, self.data(seed), loss=loss,
                                 config=self.tc(cfg.binary_epochs, 3e-4, Schedule.COSINE))
                qm = graphopt.convert(b)
            self.record(key, method, f"distilled, {cfg.binary_epochs} epoch(s)", seed, qm, quantized=True,
                        macs=macs, weight_bytes=packed(1))

        self.prune(seed, fp32, loss, macs, qat)
        self.students(seed, loss)

    def mixed(self, seed: int, fp32: nn.Module, nweights: int, qat) -> None:
        cfg, x = self.cfg, self.x
        with self.timed("mixed precision"):
            val = loader(Subset(self.train, range(len(self.train) - 2000, len(self.train))), 1000, shuffle=False)
            sens = layer_sensitivity(fp32, (x,), self.calibration(), val, bits=(4, 2),
                                     base=QuantScheme(weight_observer=Observer.MSE))
            plan = mixed_precision(sens, int(cfg.mixed_budget * 4 * nweights))
        self.log(f"  seed {seed} mixed precision: {plan.bits}, {plan.weight_bytes:,} B")
        qat("mixed", f"mixed w8/4/2 QAT (≤{cfg.mixed_budget:.0%} of fp32 bytes)", plan.scheme,
            list(plan.bits.values()))
        self.rows["mixed"].note = ("widths by sensitivity on 2k training images: "
                                   + ", ".join(f"{p} {b}" for p, b in plan.bits.items()))

    def prune(self, seed: int, fp32: nn.Module, loss: DistillationLoss, macs: int, qat) -> None:
        """Two phases of `prune_iteratively` (distilled fine-tuning after every step), each ending with a
        longer distilled fine-tune: to the 3× model, then from it on to the 5× one; then int8 QAT of that."""
        cfg, x = self.cfg, self.x
        model = copy.deepcopy(fp32)
        for phase, (key, kept, epochs) in enumerate((("p3", cfg.prune_targets[0], cfg.prune_final_epochs[0]),
                                                     ("p5", cfg.prune_targets[1], cfg.prune_final_epochs[1]))):
            def fine_tune(m: nn.Module, step: int, phase: int = phase) -> None:
                graphopt.distill(m, None, self.data(seed + 100 * phase + step, cfg.prune_step_fraction), loss=loss,
                                 config=self.tc(1, 5e-4, Schedule.COSINE))

            with self.timed("prune"):
                now = _cost(model, x)[0]  # prune_iteratively's budget is relative to the model it is given
                model = graphopt.prune_iteratively(model, (x,), graphopt.PruneConfig(target_macs=kept * macs / now),
                                                   steps=cfg.prune_steps, fine_tune=fine_tune)
            with self.timed(f"prune fine-tune {key}"):
                graphopt.distill(model, None, self.data(seed + 7 + phase), loss=loss,
                                 config=self.tc(epochs, 2e-3, Schedule.ONE_CYCLE))
            m, n = _cost(model, x)
            note = f"{(phase + 1) * cfg.prune_steps} steps; distilled fine-tuning {epochs} epochs"
            self.record(key, f"pruned {macs / m:.1f}×", note, seed, model.eval(), quantized=False, macs=m,
                        weight_bytes=4 * n)
        qat("p5int8", f"pruned {macs / m:.1f}× + int8 QAT", QuantScheme(), 8, model=model, macs=m)

    def students(self, seed: int, loss: DistillationLoss) -> None:
        cfg, x = self.cfg, self.x
        torch.manual_seed(10_000 + seed)
        scratch = FashionNet(cfg.student_width)
        distilled = copy.deepcopy(scratch)
        tc = self.tc(cfg.student_epochs, 3e-3, Schedule.ONE_CYCLE)
        with self.timed("student"):
            fit(scratch, self.data(seed + 11), ce, tc)
            graphopt.distill(distilled, None, self.data(seed + 11), loss=loss, config=tc)
        m, n = _cost(scratch, x)
        self.record("scratch", f"student w{cfg.student_width}, scratch", f"{cfg.student_epochs} epochs, labels", seed,
                    scratch.eval(), quantized=False, macs=m, weight_bytes=4 * n)
        self.record("distilled", f"student w{cfg.student_width}, distilled", f"{cfg.student_epochs} epochs, "
                    f"α={loss.alpha:g} β={loss.beta:g} τ={loss.temperature:g}", seed, distilled.eval(),
                    quantized=False, macs=m, weight_bytes=4 * n)

    # ---- the distillation search (seed 0's fp32 teacher, validation split of the training images)
    def choose_distillation(self) -> DistillationLoss:
        cfg = self.cfg
        n = len(self.train)
        train = loader(Subset(self.cached, range(n - cfg.val_size)), cfg.batch, seed=12345)
        val = loader(Subset(self.train, range(n - cfg.val_size, n)), 1000, shuffle=False)
        torch.manual_seed(12345)
        with self.timed("distillation search"):
            self.search = search_distillation(FashionNet(cfg.student_width), None, train, val,
                                              config=self.tc(cfg.student_epochs, 3e-3, Schedule.ONE_CYCLE))
        s = self.search
        self.log(f"distillation search: scratch {100 * s.scratch_accuracy:.2f}%, "
                 + ", ".join(f"α={lo.alpha:g} τ={lo.temperature:g}: {100 * a:.2f}%" for lo, a in s.trials))
        if s.loss is None:
            self.log("distillation search: no setting beat the scratch student; using the best trial anyway")
            return max(s.trials, key=lambda t: t[1])[0]
        return s.loss

    # ---- compile seed 0's models at batch 1: latency and instructions
    def deploy(self) -> None:
        cfg, x = self.cfg, self.x
        for key, model in self.models.items():
            r = self.rows[key]
            with self.timed("compile host"):
                cm = graphopt.compile(model, (x,), "host", progress=False)
            for _ in range(10):
                cm(x)
            times = []
            for _ in range(cfg.latency_runs):
                t0 = time.perf_counter()
                cm(x)
                times.append((time.perf_counter() - t0) * 1e3)
            r.latency_ms = statistics.median(times)
            if cfg.arm_target:
                with self.timed("compile + emulate arm"):
                    am = graphopt.compile(model, (x,), cfg.arm_target, progress=False, count_instructions=True)
                    r.instructions = am.report.instructions_per_inference
                    if key in self.quantized:  # the emulated artifact vs the integer graph, on 2 test images
                        ig = graphopt.to_integer(model, (x,))
                        probe = self.test.tensors[0][:2]
                        exact = all(torch.equal(am(probe[i:i + 1]), ig(probe[i:i + 1])) for i in range(len(probe)))
                        r.bit_exact += ", aarch64 ✓" if exact else ", aarch64 ✗"
                        if not exact:
                            raise SystemExit(f"{r.method}: the aarch64 artifact differs from its integer graph")
            self.log(f"  {r.method}: host {r.latency_ms:.3f} ms, {cfg.arm_target or 'no arm'}: "
                     f"{r.instructions} instructions")

    def run(self) -> dict:
        t0, c0 = time.time(), os.times()
        loss = None
        for seed in range(self.cfg.seeds):
            self.log(f"seed {seed}")
            fp32 = self.train_fp32(seed)
            if loss is None:
                loss = self.choose_distillation()
            self.run_seed(seed, fp32, loss)
        self.deploy()
        c1 = os.times()
        cpu = sum(getattr(c1, f) - getattr(c0, f) for f in ("user", "system", "children_user", "children_system"))
        return self.results(time.time() - t0, cpu)

    def results(self, wall: float, cpu: float) -> dict:
        return {"config": asdict(self.cfg), "rows": [asdict(r) | {"mean": r.mean, "std": r.std}
                                                     for r in self.rows.values()],
                "distillation_search": self.search.to_dict() if self.search else None,
                "cpu_seconds_by_part": dict(sorted(self.timings.items())), "cpu_seconds": cpu,
                "wall_seconds": wall, "torch_threads": torch.get_num_threads()}


def table(results: dict) -> str:
    rows = results["rows"]
    fp32 = rows[0]
    target = results["config"]["arm_target"] or "aarch64"
    lines = [f"| method | test accuracy % (mean ± std) | Δ vs fp32 | seeds | MACs | weight bytes | host latency ms | "
             f"{target} instructions | bit-exact | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = f"{r['latency_ms']:.3f}" if r["latency_ms"] is not None else "–"
        ins = f"{r['instructions']:,}" if r["instructions"] else "–"
        lines.append(f"| {r['method']} | {r['mean']:.2f} ± {r['std']:.2f} | {r['mean'] - fp32['mean']:+.2f} | "
                     f"{' / '.join(f'{a:.2f}' for a in r['accuracies'])} | {r['macs']:,} | {r['weight_bytes']:,} | "
                     f"{lat} | {ins} | {r['bit_exact'] or '–'} | {r['note']} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["instructions"]]
    key, label = ("instructions", f"{results['config']['arm_target']} instructions per inference (QEMU)") if rows \
        else ("macs", "MACs")
    rows = rows or results["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        lo, hi = min(r["accuracies"]), max(r["accuracies"])
        ax.errorbar(r[key], r["mean"], yerr=[[r["mean"] - lo], [hi - r["mean"]]], fmt="o", capsize=3)
        ax.annotate(r["method"], (r[key], r["mean"]), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.axhline(results["rows"][0]["mean"], color="gray", linestyle="--", linewidth=0.8, label="fp32")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("Fashion-MNIST test accuracy % (mean, min–max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the slow test's smaller configuration")
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--arm-target", help="aarch64 target for instruction counts (default arm-a55)")
    ap.add_argument("--no-arm", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("build/compression"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # read when TVM's thread pool starts (first artifact call)
    cfg = QUICK if a.quick else Config()
    if a.seeds:
        cfg = replace(cfg, seeds=a.seeds)
    if a.arm_target:
        cfg = replace(cfg, arm_target=a.arm_target)
    if a.no_arm:
        cfg = replace(cfg, arm_target=None)
    try:
        results = Bench(cfg).run()
    except graphopt.GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "compression.json").write_text(json.dumps(results, indent=2))
    (a.out / "compression.md").write_text(table(results))
    plot(results, a.out / "compression.png")
    print(table(results))
    print(f"cpu {results['cpu_seconds']:.0f} s (this process and its compilers/emulators), wall "
          f"{results['wall_seconds']:.0f} s; by part: {results['cpu_seconds_by_part']}; written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
