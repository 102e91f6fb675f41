"""Targets: specs, the registry, backends, and the built-in x86 host and Cortex-A targets."""
from graphopt.targets.registry import aliases_of, get_target, list_targets, register_target
from graphopt.targets.spec import Feature, Runtime, TargetSpec
from graphopt.targets import cortex_a as _cortex_a  # noqa: F401  (registers arm-*)
from graphopt.targets import host as _host  # noqa: F401  (registers host)

__all__ = ["Feature", "Runtime", "TargetSpec", "aliases_of", "get_target", "list_targets", "register_target"]
from graphopt.targets import tvm_vm as _tvm_vm  # noqa: F401,E402  (registers the TVM VM backends)
