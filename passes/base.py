"""Pass infrastructure: `GraphPass`, `PassResult`, `PassContext`, `Decline`.

A pass rewrites an ATen-level fx `GraphModule` (see `graphopt.capture`) and returns a
`PassResult` whose ``modified`` is honest: a second run of any pass on its own output reports
``modified=False``. Rewrites a pass chooses not to make are returned as `Decline`s, never
skipped silently. Passes declare the graph properties they ``requires`` and ``establishes``;
`graphopt.passes.manager.PassManager` checks them.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx

from graphopt.source import node_source


class Property:
    """Names of graph properties that passes require and establish."""

    ATEN = "aten"  # captured ATen-level graph with get_attr parameters (graphopt.capture)
    FUNCTIONAL = "functional"  # in-place ops in their functional form where nothing else observes the mutation
    INFERENCE = "inference"  # captured in eval mode: dropout inert, BN uses running statistics
    NO_IDENTITY = "no-identity"  # eval no-ops removed
    BN_FOLDED = "bn-folded"  # every foldable BatchNorm folded into its producer


@dataclass(frozen=True)
class Decline:
    """A rewrite a pass could have made but did not, and why."""

    pass_name: str
    node: str
    where: str
    reason: str

    @staticmethod
    def at(pass_name: str, node: fx.Node, reason: str) -> Decline:
        return Decline(pass_name, node.name, node_source(node), reason)

    def to_dict(self) -> dict:
        return {"pass": self.pass_name, "node": self.node, "where": self.where, "reason": self.reason}


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)
    declined: tuple[Decline, ...] = ()


@dataclass
class PassContext:
    """What passes may read besides the graph: example inputs, target, established properties."""

    example_inputs: tuple[torch.Tensor, ...]
    target: object = None  # graphopt.targets.TargetSpec
    properties: set[str] = field(default_factory=set)


class GraphPass(abc.ABC):
    """Base class of every fx pass. Subclasses set ``name`` and implement `run`."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset({Property.ATEN})
    establishes: ClassVar[frozenset[str]] = frozenset()
    exact: ClassVar[bool] = True  # numerics preserved up to floating-point reassociation

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
