"""graphopt: a compiler-style graph optimizer that makes PyTorch models small and fast on ARM.

    cm = graphopt.compile(model, example_inputs=(x,), target="arm")
    y = cm(x); cm.save("build/"); print(cm.report)
"""
import warnings as _warnings

# torch 2.13's own pytree code trips its LeafSpec deprecation on every export; it is not actionable here.
_warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

from graphopt.api import GraphoptWarning, compile
from graphopt.capture import CaptureMethod, capture
from graphopt.compiled import CompiledModel
from graphopt.errors import (ArtifactError, CaptureError, ConfigError, GraphoptError, InputError, LoweringError,
                             NumericsError, PassError, QuantizationError, ToolchainError, UnknownTargetError,
                             UnsupportedModelError)
from graphopt.legalize import CheckResult, OperatorSetError, check
from graphopt.pipeline import PassManager, default_passes
from graphopt.prune import Criterion, PruneConfig, PruneReport, apply_plan, prunable_groups, prune, prune_iteratively
from graphopt.regularize import Norm, filter_norm_penalty, weight_penalty
from graphopt.report import Report
from graphopt.sparsity import Scope, load_sparse, magnitude_prune, remove_masks, save_sparse
from graphopt.targets import Feature, Runtime, TargetSpec, get_target, list_targets, register_target
from graphopt.targets.opset import OperatorSet, OpRule
from graphopt.tune import RPCRunner, TuningError, TuningSummary, tune

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "CaptureError", "CaptureMethod", "CheckResult", "CompiledModel", "ConfigError", "Criterion",
    "Feature", "GraphoptError", "GraphoptWarning", "InputError", "LoweringError", "Norm", "NumericsError", "OpRule",
    "OperatorSet", "OperatorSetError", "PassError", "RPCRunner", "PassManager", "PruneConfig", "PruneReport", "Report", "Runtime", "Scope", "TargetSpec", "ToolchainError",
    "TuningError", "TuningSummary", "UnknownTargetError", "UnsupportedModelError", "apply_plan", "capture", "check", "compile", "default_passes",
    "filter_norm_penalty", "get_target", "list_targets", "load_sparse", "magnitude_prune", "prunable_groups",
    "prune", "prune_iteratively", "register_target", "remove_masks", "save_sparse", "tune", "weight_penalty",
]
