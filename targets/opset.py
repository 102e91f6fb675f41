"""Operator sets: what a target can run, as data (`OperatorSet` of `OpRule`s), and the node check.

An op *kind* is the ATen (or graphopt / quantized_decomposed) op name without overload or in-place
suffix: ``conv2d``, ``linear``, ``gelu``, ``qlut``, ... — the graph graphopt's passes see (before
TVM's decompositions). An `OpRule` admits one kind with optional constraints (dtypes, kernel
sizes, depthwise / grouped / dilated convolution); the `OperatorSet` adds the dtypes and maximum
tensor rank of compute ops, and whether pure data movement (views, slices, concatenation,
padding: `graphopt.ops.DATA_MOVEMENT`) is allowed. ``rules=None`` (`EVERYTHING`) means "whatever TVM lowers":
no node is refused here (the TVM support check still runs).

`OperatorSet.violation(node, gm)` says why a node does not fit, or None. Refuses (``ConfigError``)
malformed sets: duplicate or empty kinds, unknown dtype names, bad kernel sizes or ranks.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import fx

from graphopt.errors import ConfigError
from graphopt.ops import CONV_KINDS, DATA_MOVEMENT, POOL_KINDS, conv_params, op_kind, value

DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"})

def _pairs(value) -> frozenset[tuple[int, int]]:
    pairs = frozenset((k, k) if isinstance(k, int) else tuple(k) for k in value)
    if any(len(p) != 2 or not all(isinstance(v, int) and v > 0 for v in p) for p in pairs):
        raise ConfigError(f"kernel_sizes must be positive ints or (kh, kw) pairs, got {sorted(value)}")
    return pairs


@dataclass(frozen=True)
class OpRule:
    """One admitted op kind and its constraints (None = unconstrained).

    dtypes:        dtype names its tensors may have (None = the set's ``dtypes``).
    kernel_sizes:  (kh, kw) pairs a convolution or pooling window may have; ints mean k×k.
    depthwise / grouped / dilation: whether convolutions with groups == channels, 1 < groups <
                   channels, or dilation > 1 run on the device.
    note:          one line for ``graphopt targets --ops``.
    """

    kind: str
    dtypes: Collection[str] | None = None  # stored as a frozenset
    kernel_sizes: Collection[int | tuple[int, int]] | None = None  # stored as a frozenset of (kh, kw)
    depthwise: bool = True
    grouped: bool = True
    dilation: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ConfigError(f"OpRule kind must be a non-empty op name like 'conv2d', got {self.kind!r}")
        if self.dtypes is not None:
            object.__setattr__(self, "dtypes", _dtype_names(self.dtypes, self.kind))
        if self.kernel_sizes is not None:
            object.__setattr__(self, "kernel_sizes", _pairs(self.kernel_sizes))

    def describe(self) -> str:
        parts = []
        if self.kernel_sizes is not None:
            parts.append("kernels " + ", ".join(f"{h}×{w}" for h, w in sorted(_pairs(self.kernel_sizes))))
        if self.kind in CONV_KINDS:
            parts += [f"{name} {'yes' if ok else 'no'}" for name, ok in
                      (("depthwise", self.depthwise), ("grouped", self.grouped), ("dilated", self.dilation))]
        if self.dtypes is not None:
            parts.append("dtypes " + ", ".join(sorted(self.dtypes)))
        return "; ".join(parts + ([self.note] if self.note else []))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "dtypes": sorted(self.dtypes) if self.dtypes is not None else None,
                "kernel_sizes": sorted(list(k) for k in _pairs(self.kernel_sizes))
                if self.kernel_sizes is not None else None,
                "depthwise": self.depthwise, "grouped": self.grouped, "dilation": self.dilation, "note": self.note}


def _dtype_names(names, where: str) -> frozenset:
    names = frozenset(names)
    bad = sorted(n for n in names if n not in DTYPES)
    if bad:
        raise ConfigError(f"{where}: unknown dtype names {bad}; use {sorted(DTYPES)}")
    return names


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class OperatorSet:
    """What a device runs. ``rules=None`` admits everything TVM lowers; see the module docstring."""

    name: str
    rules: tuple[OpRule, ...] | None = None
    dtypes: Collection[str] = field(default_factory=lambda: frozenset(DTYPES))  # stored as a frozenset
    max_rank: int | None = None
    data_movement: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtypes", _dtype_names(self.dtypes, f"operator set {self.name}"))
        if self.max_rank is not None and (not isinstance(self.max_rank, int) or self.max_rank < 1):
            raise ConfigError(f"operator set {self.name}: max_rank must be a positive int or None")
        if self.rules is not None:
            rules = tuple(self.rules)
            if any(not isinstance(r, OpRule) for r in rules):
                raise ConfigError(f"operator set {self.name}: rules must be OpRule instances")
            kinds = [r.kind for r in rules]
            dup = sorted({k for k in kinds if kinds.count(k) > 1})
            if dup:
                raise ConfigError(f"operator set {self.name}: kinds listed twice: {dup}")
            object.__setattr__(self, "rules", rules)

    @property
    def unrestricted(self) -> bool:
        return self.rules is None

    def rule(self, kind: str) -> OpRule | None:
        if self.rules is None:
            return OpRule(kind)
        return next((r for r in self.rules if r.kind == kind), None)

    def has(self, *kinds: str) -> bool:
        """Every kind is admitted (data movement kinds count when the set allows data movement)."""
        return all(self.rule(k) is not None or (self.data_movement and k in DATA_MOVEMENT) for k in kinds)

    def violation(self, node: fx.Node, gm: fx.GraphModule, *, tensors: bool = True) -> str | None:
        """Why ``node`` does not run on this set, or None if it does (or is not a call).

        ``tensors=False`` skips the dtype and rank checks: what rewrites of the op can fix.
        """
        kind = op_kind(node)
        if kind is None or self.rules is None:
            return None
        if self.data_movement and kind in DATA_MOVEMENT and self.rule(kind) is None:
            return None
        rule = self.rule(kind)
        if rule is None:
            return f"{kind} is not in the {self.name} operator set"
        if tensors:
            values = [t for t in (value(a, gm) for a in (node, *node.all_input_nodes)) if t is not None]
            allowed = rule.dtypes if rule.dtypes is not None else self.dtypes
            bad = sorted({_dtype_name(t) for t in values} - set(allowed))
            if bad:
                return (f"{kind} on {', '.join(bad)} tensors (the {self.name} set runs {kind} on "
                        f"{', '.join(sorted(allowed))})")
            rank = max((t.dim() for t in values), default=0)
            if self.max_rank is not None and rank > self.max_rank:
                return f"{kind} on a rank-{rank} tensor (the {self.name} set allows rank ≤ {self.max_rank})"
        if kind in CONV_KINDS:
            return _conv_violation(node, gm, kind, rule)
        if kind in POOL_KINDS and rule.kernel_sizes is not None:
            k = tuple(node.args[1]) * (2 if len(node.args[1]) == 1 else 1)
            if k not in rule.kernel_sizes:
                return f"{kind} with a {k[0]}×{k[1]} window (allowed: {rule.describe()})"
        return None

    def describe(self) -> str:
        """Human-readable listing for ``graphopt targets --ops``."""
        if self.rules is None:
            head = f"{self.name}: every operator TVM lowers (no restrictions)"
            return head + (f"\n  {self.note}" if self.note else "")
        lines = [f"{self.name}: dtypes {', '.join(sorted(self.dtypes))}; max rank "
                 f"{self.max_rank if self.max_rank is not None else 'any'} (compute ops); data movement "
                 f"{'allowed' if self.data_movement else 'not allowed'}"]
        if self.note:
            lines.append(f"  {self.note}")
        width = max(len(r.kind) for r in self.rules) if self.rules else 0
        lines += [f"  {r.kind:<{width}}  {r.describe()}".rstrip() for r in sorted(self.rules, key=lambda r: r.kind)]
        if self.data_movement:
            lines.append(f"  (data movement: {', '.join(sorted(DATA_MOVEMENT))})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"name": self.name, "unrestricted": self.rules is None,
                "rules": [r.to_dict() for r in self.rules] if self.rules is not None else None,
                "dtypes": sorted(self.dtypes), "max_rank": self.max_rank, "data_movement": self.data_movement,
                "note": self.note}


def _conv_violation(node: fx.Node, gm: fx.GraphModule, kind: str, rule: OpRule) -> str | None:
    if rule.kernel_sizes is None and rule.depthwise and rule.grouped and rule.dilation:
        return None
    params = conv_params(node, gm)
    if params is None:
        return f"{kind} with an unknown weight shape"
    kernel, groups, dilation, cin = params
    if rule.kernel_sizes is not None and kernel not in rule.kernel_sizes:
        return f"{kind} with a {kernel[0]}×{kernel[1]} kernel (allowed: {rule.describe()})"
    if groups > 1 and groups == cin and not rule.depthwise:
        return f"depthwise {kind} (groups={groups}) is not supported by the {rule.kind} kernels here"
    if 1 < groups < cin and not rule.grouped:
        return f"grouped {kind} (groups={groups}) is not supported by the {rule.kind} kernels here"
    if any(d != 1 for d in dilation) and not rule.dilation:
        return f"dilated {kind} (dilation={list(dilation)}) is not supported by the {rule.kind} kernels here"
    return None


EVERYTHING = OperatorSet("tvm", None, note="everything the TVM importer and graphopt's converters lower")
