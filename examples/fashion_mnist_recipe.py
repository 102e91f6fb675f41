"""Fashion-MNIST, end to end: train a teacher CNN, then prune → distill → int8 → compile for ARM.

Also measures what the recipe's parts buy on real data:
  * distillation vs the same small student trained from scratch on hard labels (same epochs);
  * teacher pseudo-labels: a student trained on a small labeled split, with and without the rest
    of the training set labeled by the teacher.

    python examples/fashion_mnist_recipe.py [--target arm] [--epochs 2] [--out build/fmnist]

Data: Debian's dataset-fashion-mnist (60k train / 10k test), nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import graphopt
from graphopt.datasets import fashion_mnist
from graphopt.distillation import DistillationLoss, distill, loader, pseudo_label
from graphopt.recipe import PruneStage, QuantStage, Recipe, Stop, optimize
from graphopt.training import TrainConfig, evaluate, fit


class Teacher(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def run(target: str = "arm", epochs: int = 2, out: Path = Path("build/fmnist"), train_limit: int | None = None,
        progress: bool = True) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    train_set, test_set = fashion_mnist("train", limit=train_limit), fashion_mnist("test")
    train, test = loader(train_set, 128), loader(test_set, 1000, shuffle=False)
    cfg = TrainConfig(epochs=epochs, lr=2e-3, progress=progress)
    figures: dict = {}

    t0 = time.time()
    teacher = Teacher()
    fit(teacher, train, ce, cfg)
    figures["teacher_accuracy"] = evaluate(teacher, test)
    print(f"teacher: {figures['teacher_accuracy']:.4f} ({time.time() - t0:.0f} s)")

    # Distillation vs scratch: the same small student, the same epochs.
    scratch, distilled = Teacher(width=8), Teacher(width=8)
    distilled.load_state_dict(scratch.state_dict())
    fit(scratch, train, ce, cfg)
    distill(distilled, teacher, train, loss=DistillationLoss(alpha=0.5, beta=0.5, temperature=4.0), config=cfg)
    figures["student_scratch_accuracy"] = evaluate(scratch, test)
    figures["student_distilled_accuracy"] = evaluate(distilled, test)
    print(f"student from scratch: {figures['student_scratch_accuracy']:.4f}, "
          f"distilled: {figures['student_distilled_accuracy']:.4f}")

    # Pseudo-labels: 2k labeled images, the rest of the training set labeled by the teacher.
    n = len(train_set)
    labeled = torch.utils.data.Subset(train_set, range(2000))
    unlabeled = loader(torch.utils.data.Subset(train_set, range(2000, n)), 512, shuffle=False)
    extra = pseudo_label(teacher, unlabeled, hard=True, threshold=0.7)
    small, grown = Teacher(width=8), Teacher(width=8)
    grown.load_state_dict(small.state_dict())
    fit(small, loader(labeled, 128), ce, TrainConfig(epochs=epochs * 3, lr=2e-3, progress=progress))
    fit(grown, loader(torch.utils.data.ConcatDataset([labeled, extra]), 128), ce, cfg)
    figures["pseudo_label_added"] = len(extra)
    figures["labeled_only_accuracy"] = evaluate(small, test)
    figures["with_pseudo_labels_accuracy"] = evaluate(grown, test)
    print(f"2k labeled only: {figures['labeled_only_accuracy']:.4f}; + {len(extra)} teacher-labeled: "
          f"{figures['with_pseudo_labels_accuracy']:.4f}")

    # The recipe: ≥ 3× fewer MACs in steps with distilled fine-tuning, then int8, then compile.
    floor = figures["teacher_accuracy"] - 0.01
    recipe = Recipe(prune=PruneStage(steps=3, epochs_per_step=1), quantize=QuantStage(weights=8, activations=8),
                    distill=True, stop=Stop(min_accuracy=floor, max_macs=0.3),
                    train=TrainConfig(epochs=1, lr=1e-3, progress=progress))
    result = optimize(teacher, train, test, target, recipe=recipe, out_dir=out, progress=progress)
    kept = [s for s in result.report.steps if s.kept]
    figures["recipe"] = result.report.to_dict()
    figures["final_step"] = kept[-1].step
    figures["final_accuracy"] = kept[-1].accuracy
    figures["macs_reduction"] = result.report.steps[0].macs / kept[-1].macs
    print(result.report.to_markdown())
    out.mkdir(parents=True, exist_ok=True)
    result.compiled.save(out / "artifact")
    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    print(f"final: {figures['final_step']} accuracy {figures['final_accuracy']:.4f} "
          f"(teacher {figures['teacher_accuracy']:.4f}), {figures['macs_reduction']:.2f}x fewer MACs; "
          f"plot {out / 'optimize.png'}")
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="arm")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("build/fmnist"))
    a = p.parse_args(argv)
    try:
        run(a.target, a.epochs, a.out)
    except graphopt.GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
