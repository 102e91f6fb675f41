"""graphopt: a compiler-style graph optimizer that makes PyTorch models small and fast on ARM.

    cm = graphopt.compile(model, example_inputs=(x,), target="arm")
    y = cm(x); cm.save("build/model"); print(cm.report)

The public names below load on first use (PEP 562), so importing a lower layer — a pass
(``graphopt.passes.*``) or a target module (``graphopt.targets.*``) — does not import the API.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(["ArtifactError", "CaptureError", "ConfigError", "GraphoptError", "GraphoptWarning", "InputError",
                     "LoweringError", "NumericsError", "OperatorSetError", "PassError", "QuantizationError",
                     "ToolchainError", "TuningError", "UnknownTargetError", "UnsupportedModelError"],
                    "graphopt.errors"),
    **dict.fromkeys(["CheckResult", "check", "compile"], "graphopt.api"),
    **dict.fromkeys(["CaptureMethod", "capture"], "graphopt.passes.capture"),
    "CompiledModel": "graphopt.compiled",
    "OptimizeFor": "graphopt.config",
    **dict.fromkeys(["DistillSearch", "DistillationLoss", "Ensemble", "SoftLoss", "distill", "pseudo_label",
                     "search_distillation", "teacher_logits"], "graphopt.distillation"),
    **dict.fromkeys(["MixedPrecision", "Sensitivity", "layer_sensitivity", "mixed_precision"],
                    "graphopt.precision"),
    **dict.fromkeys(["PassManager", "default_passes"], "graphopt.passes.manager"),
    **dict.fromkeys(["Criterion", "PruneConfig", "PruneReport", "apply_plan", "prunable_groups", "prune",
                     "prune_iteratively"], "graphopt.pruning"),
    **dict.fromkeys(["LayerQuant", "Observer", "QuantScheme", "binarize", "convert", "prepare_qat", "quantize",
                     "to_integer"], "graphopt.quantization"),
    **dict.fromkeys(["OptimizeResult", "PruneStage", "QuantStage", "Recipe", "Stop", "optimize"], "graphopt.recipe"),
    **dict.fromkeys(["Norm", "filter_norm_penalty", "weight_penalty"], "graphopt.regularize"),
    "Report": "graphopt.report",
    **dict.fromkeys(["Scope", "load_sparse", "magnitude_prune", "remove_masks", "save_sparse"], "graphopt.sparsity"),
    **dict.fromkeys(["Feature", "Runtime", "TargetSpec", "get_target", "list_targets", "register_target"],
                    "graphopt.targets"),
    **dict.fromkeys(["OperatorSet", "OpRule"], "graphopt.targets.opset"),
    **dict.fromkeys(["Schedule", "TrainConfig", "evaluate", "fit"], "graphopt.training"),
    **dict.fromkeys(["RPCRunner", "TuningSummary", "tune"], "graphopt.tuning"),
}
__all__ = [
    "ArtifactError", "CaptureError", "CaptureMethod", "CheckResult", "CompiledModel", "ConfigError", "Criterion",
    "DistillSearch", "DistillationLoss", "Ensemble", "Feature", "GraphoptError", "GraphoptWarning", "InputError",
    "LayerQuant", "LoweringError", "MixedPrecision", "Norm", "NumericsError", "Observer", "OpRule", "OperatorSet",
    "OperatorSetError", "OptimizeFor", "OptimizeResult", "PassError", "PassManager", "PruneConfig", "PruneReport",
    "PruneStage", "QuantScheme", "QuantStage", "QuantizationError", "RPCRunner", "Recipe", "Report", "Runtime",
    "Schedule", "Scope", "Sensitivity", "SoftLoss", "Stop", "TargetSpec", "ToolchainError", "TrainConfig",
    "TuningError", "TuningSummary", "UnknownTargetError", "UnsupportedModelError", "apply_plan", "binarize", "capture",
    "check", "compile", "convert", "default_passes", "distill", "evaluate", "filter_norm_penalty", "fit", "get_target",
    "layer_sensitivity", "list_targets", "load_sparse", "magnitude_prune", "mixed_precision", "optimize", "prepare_qat",
    "prunable_groups", "prune", "prune_iteratively", "pseudo_label", "quantize", "register_target", "remove_masks",
    "save_sparse", "search_distillation", "teacher_logits", "to_integer", "tune", "weight_penalty",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the lazy table resolves to, for type checkers and IDEs
    from graphopt.api import CheckResult, check, compile
    from graphopt.compiled import CompiledModel
    from graphopt.config import OptimizeFor
    from graphopt.distillation import DistillationLoss, Ensemble, SoftLoss, distill, pseudo_label
    from graphopt.errors import (
        ArtifactError,
        CaptureError,
        ConfigError,
        GraphoptError,
        GraphoptWarning,
        InputError,
        LoweringError,
        NumericsError,
        OperatorSetError,
        PassError,
        QuantizationError,
        ToolchainError,
        TuningError,
        UnknownTargetError,
        UnsupportedModelError,
    )
    from graphopt.passes.capture import CaptureMethod, capture
    from graphopt.passes.manager import PassManager, default_passes
    from graphopt.pruning import (
        Criterion,
        PruneConfig,
        PruneReport,
        apply_plan,
        prunable_groups,
        prune,
        prune_iteratively,
    )
    from graphopt.quantization import (
        LayerQuant,
        Observer,
        QuantScheme,
        binarize,
        convert,
        prepare_qat,
        quantize,
        to_integer,
    )
    from graphopt.recipe import OptimizeResult, PruneStage, QuantStage, Recipe, Stop, optimize
    from graphopt.regularize import Norm, filter_norm_penalty, weight_penalty
    from graphopt.report import Report
    from graphopt.sparsity import Scope, load_sparse, magnitude_prune, remove_masks, save_sparse
    from graphopt.targets import Feature, Runtime, TargetSpec, get_target, list_targets, register_target
    from graphopt.targets.opset import OperatorSet, OpRule
    from graphopt.training import TrainConfig, evaluate, fit
    from graphopt.tuning import RPCRunner, TuningSummary, tune
