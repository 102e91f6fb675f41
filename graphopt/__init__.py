"""graphopt: a compiler-style graph optimizer that makes PyTorch models small and fast on ARM.

    cm = graphopt.compile(model, example_inputs=(x,), target="arm")
    y = cm(x); cm.save("build/model"); print(cm.report)
"""
import warnings as _warnings

# torch 2.13's own pytree code trips its LeafSpec deprecation on every export; it is not actionable here.
_warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

from graphopt.api import GraphoptWarning, compile  # noqa: E402
from graphopt.capture import CaptureMethod, capture  # noqa: E402
from graphopt.compiled import CompiledModel  # noqa: E402
from graphopt.config import OptimizeFor  # noqa: E402
from graphopt.distill import (  # noqa: E402
    DistillationLoss, DistillSearch, Ensemble, SoftLoss, distill, pseudo_label, search_distillation, teacher_logits)
from graphopt.errors import (  # noqa: E402
    ArtifactError, CaptureError, ConfigError, GraphoptError, InputError, LoweringError, NumericsError, PassError,
    QuantizationError, ToolchainError, UnknownTargetError, UnsupportedModelError)
from graphopt.legalize import CheckResult, OperatorSetError, check  # noqa: E402
from graphopt.mixed_precision import MixedPrecision, Sensitivity, layer_sensitivity, mixed_precision  # noqa: E402
from graphopt.pipeline import PassManager, default_passes  # noqa: E402
from graphopt.prune import (  # noqa: E402
    Criterion, PruneConfig, PruneReport, apply_plan, prunable_groups, prune, prune_iteratively)
from graphopt.quantize import (  # noqa: E402
    LayerQuant, Observer, QuantScheme, binarize, convert, prepare_qat, quantize, to_integer)
from graphopt.recipe import OptimizeResult, PruneStage, QuantStage, Recipe, Stop, optimize  # noqa: E402
from graphopt.regularize import Norm, filter_norm_penalty, weight_penalty  # noqa: E402
from graphopt.report import Report  # noqa: E402
from graphopt.sparsity import Scope, load_sparse, magnitude_prune, remove_masks, save_sparse  # noqa: E402
from graphopt.targets import Feature, Runtime, TargetSpec, get_target, list_targets, register_target  # noqa: E402
from graphopt.targets.opset import OperatorSet, OpRule  # noqa: E402
from graphopt.training import Schedule, TrainConfig, evaluate, fit  # noqa: E402
from graphopt.tune import RPCRunner, TuningError, TuningSummary, tune  # noqa: E402

__version__ = "0.1.0"

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
