"""Targets: specs, the registry, backends, and the built-in x86 host, Cortex-A, Cortex-M and armv7 targets."""
from graphopt.targets import armv7 as _armv7  # noqa: F401  (registers armv7)
from graphopt.targets import cortex_a as _cortex_a  # noqa: F401  (registers arm-*)
from graphopt.targets import cortex_m as _cortex_m  # noqa: F401  (registers cortex-m*)
from graphopt.targets import host as _host  # noqa: F401  (registers host)
from graphopt.targets.registry import (
    aliases_of,
    get_target,
    list_targets,
    register_target,
)
from graphopt.targets.spec import Feature, Runtime, TargetSpec

__all__ = ["Feature", "Runtime", "TargetSpec", "aliases_of", "get_target", "list_targets", "register_target"]
from graphopt.targets.backends import c_library as _c_library  # noqa: F401,E402  (registers the C library backend)
from graphopt.targets.backends import tvm_vm as _tvm_vm  # noqa: F401,E402  (registers the TVM VM backends)
