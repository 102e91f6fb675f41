"""Targets: what graphopt compiles for, as data — `TargetSpec`s, the registry, operator sets
(`opset`), board memory maps (`boards`) and the built-in specs (host, Cortex-A, Cortex-M, armv7).

The work on targets lives in sub-packages, each importing only those before it: `lowering`
(TVM Relax phases, converters, schedules, kernels), `backends` (artifacts and runners) and
`tuning` (MetaSchedule, database, RPC). This package and its data modules import none of them.
"""
from graphopt.targets.registry import aliases_of, get_target, list_targets, register_target
from graphopt.targets.spec import Feature, Runtime, TargetSpec

__all__ = ["Feature", "Runtime", "TargetSpec", "aliases_of", "get_target", "list_targets", "register_target"]
