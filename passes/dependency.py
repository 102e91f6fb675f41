"""Channel dependency analysis on a captured ATen fx graph: which channels must be removed together.

Every channel of every tensor gets an element id in a union-find; ops couple elements:
conv/linear create new output channels (members ``OUT``) and consume input channels (``IN``,
one member per weight column — flatten → linear gives a channel one column per spatial
position), BatchNorm adds ``NORM`` members, residual adds/muls unite their operands channel by
channel, concat stacks channel lists (index offsets), even split/chunk unites the pieces position
by position (so every piece loses the same positions and a relative ``chunk`` stays valid),
pooling/activations/permutes carry channels through, depthwise convs tie output channels to their
input channel and grouped convs tie position r of every group together (group structure stays
valid). A union-find class is one removable unit; classes with the same producer set form a
`Group`, the unit the budget and the report talk about.

Refused (the affected channels are *pinned*: their group is unprunable, recorded as a `Decline`):
operators the analysis does not know, channels that reach the model output, reductions or
normalizations over the channel axis (mean over C, LayerNorm, GroupNorm), reshapes that split
channels (attention heads: head pruning is not implemented) or merge them with leading axes,
slicing/unequal splits of channels (their sizes are fixed in the model's code), matmul/attention
inputs, transposed convolutions, and weights that are not the parameter of exactly one
``nn.Conv1d/2d/3d``, ``nn.Linear`` or ``nn.BatchNorm1d/2d/3d`` called once (functional calls,
shared or tied modules).
"""
from __future__ import annotations

import enum
import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from graphopt import ops
from graphopt.passes.base import Decline

aten = torch.ops.aten
PASS_NAME = "prune-channels"

def _shape(node) -> tuple[int, ...]:
    """The shape of a tensor node (`analyze_dependencies` made sure every node has one)."""
    dims = ops.shape(node)
    if dims is None:
        raise ValueError(f"{node} has no static shape")
    return dims


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Role(str, enum.Enum):
    OUT = "out"  # an output channel (weight row) of a conv/linear
    IN = "in"  # an input column of a conv/linear
    NORM = "norm"  # a BatchNorm entry


@dataclass(frozen=True, order=True)
class Member:
    module: str
    role: Role
    index: int


@dataclass(frozen=True)
class ModuleInfo:
    """A conv/linear/BN the analysis can shrink, with what the cost model needs."""

    path: str
    kind: str  # "conv" | "linear" | "bn"
    out_channels: int
    in_channels: int  # in_channels (conv) / in_features (linear) / num_features (bn)
    groups: int = 1
    kernel: int = 1  # prod(kernel_size)
    positions: int = 1  # output elements per output channel on the example inputs (MACs factor)
    has_bias: bool = False
    bn_tensors: int = 0  # affine + running-stat tensors of a BN

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.in_channels == self.groups

    def cost(self, kept_out: int, kept_in: int) -> tuple[int, int]:
        """(MACs, params) with ``kept_out`` output channels and ``kept_in`` input columns."""
        if self.kind == "bn":
            return 0, self.bn_tensors * kept_out
        per_out = 1 if self.depthwise else kept_in // self.groups
        weights = kept_out * per_out * self.kernel
        return self.positions * weights, weights + (kept_out if self.has_bias else 0)


@dataclass
class Group:
    """Channels coupled through one set of producers; ``classes`` are its removable units."""

    id: int
    producers: tuple[str, ...]
    classes: list[tuple[Member, ...]]
    reasons: list[str] = field(default_factory=list)  # why unprunable; empty = prunable

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def channels(self) -> int:
        return len(self.classes)


@dataclass
class DependencyGraph:
    groups: list[Group]
    modules: dict[str, ModuleInfo]
    declines: list[Decline]
    first_producer: str | None

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]


@dataclass(frozen=True)
class _Chan:
    axis: int
    ids: tuple[int, ...]


class _Analysis:
    def __init__(self, gm: fx.GraphModule, model: nn.Module):
        self.gm, self.model = gm, model
        self.parent: list[int] = []
        self.members: list[list[Member]] = []
        self.pin: dict[int, str] = {}
        self.declines: dict[tuple[str, str], Decline] = {}
        self.chan: dict[fx.Node, object] = {}
        self.modules: dict[str, ModuleInfo] = {}
        self.calls: dict[str, int] = {}
        self.first_producer: str | None = None

    # union-find over channel elements
    def new(self, n: int, pin: str | None = None) -> tuple[int, ...]:
        start = len(self.parent)
        self.parent += range(start, start + n)
        self.members += [[] for _ in range(n)]
        if pin:
            self.pin.update({i: pin for i in range(start, start + n)})
        return tuple(range(start, start + n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def pin_chan(self, c, node: fx.Node, reason: str) -> None:
        chans = c if isinstance(c, list) else [c]
        for ch in chans:
            if isinstance(ch, _Chan):
                for i in ch.ids:
                    self.pin.setdefault(i, reason)
        if any(isinstance(ch, _Chan) for ch in chans):
            self.declines.setdefault((node.name, reason), Decline.at(PASS_NAME, node, reason))

    # helpers
    def tracked(self, n):
        return self.chan.get(n) if isinstance(n, fx.Node) else None

    def input_chan(self, n: fx.Node, axis: int, why: str) -> _Chan:
        """The channels of ``n`` along ``axis``; untracked or differently-tracked tensors get pinned ids."""
        c = self.tracked(n)
        if isinstance(c, _Chan) and c.axis == axis:
            return c
        if isinstance(c, _Chan):
            self.pin_chan(c, n, f"channels arrive on axis {c.axis} where {why} expects axis {axis}")
        return _Chan(axis, self.new(_shape(n)[axis], pin="channels come from outside any prunable group"))

    def param_owner(self, n, kinds, attr: str) -> tuple[str, nn.Module] | None:
        """(module path, module) if ``n`` reads ``<path>.<attr>`` of a module of ``kinds``."""
        if not (isinstance(n, fx.Node) and n.op == "get_attr"):
            return None
        path, _, name = n.target.rpartition(".")
        if name != attr:
            return None
        try:
            mod = self.model.get_submodule(path)
        except AttributeError:
            return None
        return (path, mod) if isinstance(mod, kinds) and getattr(mod, attr, None) is not None else None

    def add_members(self, ids, path: str, role: Role) -> None:
        for index, i in enumerate(ids):
            self.members[i].append(Member(path, role, index))

    # the walk
    def run(self) -> DependencyGraph:
        for n in self.gm.graph.nodes:
            if n.op == "get_attr":
                self.calls[n.target] = self.calls.get(n.target, 0) + len(n.users)
        for node in self.gm.graph.nodes:
            self.visit(node)
        return self.collect()

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            s = _shape(node)
            if s is not None and len(s) >= 2:
                self.chan[node] = _Chan(1, self.new(s[1], pin="model input channels"))
            return
        if node.op == "output":
            for n in node.all_input_nodes:
                self.pin_chan(self.tracked(n), n, "channels reach the model output")
            return
        if node.op != "call_function":
            return
        t = node.target
        if t is operator.getitem:
            src = self.tracked(node.args[0])
            self.chan[node] = src[node.args[1]] if isinstance(src, list) else None
            return
        rule = (self.conv if t in ops.CONV else self.linear if t is aten.linear.default
                else self.batch_norm if t in ops.BATCH_NORMS
                else self.passthrough if t in ops.CHANNELWISE or t in ops.SPATIAL
                else self.binary if t in ops.BINARY
                else self.reduce if t in ops.REDUCE
                else self.reshape if t in ops.RESHAPE
                else self.permute if t in (aten.permute.default, aten.transpose.int, aten.t.default)
                else self.cat if t is aten.cat.default
                else self.split if t in ops.SPLIT
                else self.slice_select if t in (aten.slice.Tensor, aten.select.int)
                else self.norm_over if t in (aten.layer_norm.default, aten.group_norm.default)
                else self.pad if t in (aten.constant_pad_nd.default, aten.pad.default)
                else None)
        if rule is None:
            why = ("matmul/attention mixes channels; head pruning is not implemented, the group is kept"
                   if t in ops.MIXING else f"operator {t} is not understood by the pruning analysis")
            for n in node.all_input_nodes:
                self.pin_chan(self.tracked(n), node, why)
            return
        rule(node)

    def conv(self, node: fx.Node) -> None:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        owner = self.param_owner(w, _CONV_MODULES, "weight")
        out_shape = _shape(node)
        cout = out_shape[1]
        if (owner is None or (b is not None and self.param_owner(b, _CONV_MODULES, "bias") != owner)
                or self.calls.get(w.target, 0) != 1 or owner[1].padding_mode != "zeros"):
            self.pin_chan(self.tracked(x), node, "convolution weights are not the parameters of one nn.Conv "
                                                 "module called once (functional call, shared or tied weights)")
            self.chan[node] = _Chan(1, self.new(cout, pin="output of a convolution that cannot be shrunk"))
            return
        path, mod = owner
        xin = self.input_chan(x, 1, f"conv {path}")
        cin = len(xin.ids)
        out = self.new(cout)
        self.add_members(out, path, Role.OUT)
        self.add_members(xin.ids, path, Role.IN)
        cin_g, cout_g = cin // groups, cout // groups
        if groups > 1 and cin_g == 1:  # depthwise (with channel multiplier): out channel o reads input o // cout_g
            for o in range(cout):
                self.union(out[o], xin.ids[o // cout_g])
        elif groups > 1:  # grouped: remove position r of every group at once
            for j in range(1, groups):
                for r in range(cin_g):
                    self.union(xin.ids[r], xin.ids[j * cin_g + r])
                for r in range(cout_g):
                    self.union(out[r], out[j * cout_g + r])
        self.modules[path] = ModuleInfo(path, "conv", cout, cin, groups, math.prod(_shape(w)[2:]),
                                        math.prod(out_shape) // cout, b is not None)
        self.first_producer = self.first_producer or path
        self.chan[node] = _Chan(1, out)

    def linear(self, node: fx.Node) -> None:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        owner = self.param_owner(w, nn.Linear, "weight")
        out_shape = _shape(node)
        axis = len(out_shape) - 1
        if (owner is None or (b is not None and self.param_owner(b, nn.Linear, "bias") != owner)
                or self.calls.get(w.target, 0) != 1):
            self.pin_chan(self.tracked(x), node, "linear weights are not the parameters of one nn.Linear module "
                                                 "called once (functional call, shared or tied weights)")
            self.chan[node] = _Chan(axis, self.new(out_shape[-1], pin="output of a linear that cannot be shrunk"))
            return
        path, _ = owner
        xin = self.input_chan(x, len(_shape(x)) - 1, f"linear {path}")
        out = self.new(out_shape[-1])
        self.add_members(out, path, Role.OUT)
        self.add_members(xin.ids, path, Role.IN)
        self.modules[path] = ModuleInfo(path, "linear", out_shape[-1], len(xin.ids),
                                        positions=math.prod(out_shape) // out_shape[-1], has_bias=b is not None)
        self.first_producer = self.first_producer or path
        self.chan[node] = _Chan(axis, out)

    def batch_norm(self, node: fx.Node) -> None:
        x, params = node.args[0], node.args[1:5]
        names = ("weight", "bias", "running_mean", "running_var")
        owners = {self.param_owner(p, _BN, a) for p, a in zip(params, names, strict=False)
                  if p is not None}
        c = self.tracked(x)
        result = (lambda ch: ch) if node.target is aten.batch_norm.default else (lambda ch: [ch, None, None])
        if len(owners) != 1 or None in owners or params[2] is None or self.calls.get(params[2].target, 0) != 1:
            self.pin_chan(c, node, "BatchNorm parameters are not those of one nn.BatchNorm module called once "
                                   "with running statistics")
            self.chan[node] = result(c)
            return
        (owner,) = owners
        if owner is None:  # refused above: `None in owners`
            return
        path, mod = owner
        xin = self.input_chan(x, 1, f"BatchNorm {path}")
        self.add_members(xin.ids, path, Role.NORM)
        n_tensors = sum(p is not None for p in params)
        self.modules[path] = ModuleInfo(path, "bn", len(xin.ids), len(xin.ids), bn_tensors=n_tensors)
        self.chan[node] = result(xin)

    def passthrough(self, node: fx.Node) -> None:
        c = self.tracked(node.args[0])
        s_in, s_out = _shape(node.args[0]), _shape(node)
        if isinstance(c, _Chan) and s_out is not None and len(s_out) == len(s_in) and s_out[c.axis] == s_in[c.axis]:
            self.chan[node] = c
        elif c is not None:
            self.pin_chan(c, node, f"{node.target} changes the channel axis")

    def binary(self, node: fx.Node) -> None:
        out = _shape(node)
        if out is None:
            return
        rank = len(out)
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        chans = [self.tracked(a) for a in tensors]
        axes = {c.axis - len(_shape(a)) for a, c in zip(tensors, chans, strict=True) if isinstance(c, _Chan)}
        if not axes:
            return
        if len(axes) > 1:
            for c in chans:
                self.pin_chan(c, node, "operands carry channels on different axes")
            return
        neg = axes.pop()
        result = None
        for a, c in zip(tensors, chans, strict=True):
            s = _shape(a)
            size = s[neg] if len(s) >= -neg else 1
            if isinstance(c, _Chan):
                if result is None:
                    result = c
                else:
                    for i, j in zip(result.ids, c.ids, strict=False):
                        self.union(i, j)
            elif size > 1:  # a constant or untracked tensor indexed by channel: cannot be sliced
                for c2 in chans:
                    self.pin_chan(c2, node, "combined with a per-channel tensor that is not a prunable layer's "
                                            "output (constant or untracked)")
                return
        if result is not None:  # the loop saw at least one tracked operand (axes is not empty)
            self.chan[node] = _Chan(rank + neg, result.ids)

    def reduce(self, node: fx.Node) -> None:
        c = self.tracked(node.args[0])
        if not isinstance(c, _Chan):
            return
        rank = len(_shape(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else None
        dims = [d % rank for d in ([dims] if isinstance(dims, int) else dims)] if dims else list(range(rank))
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if c.axis in dims:
            self.pin_chan(c, node, "reduction over the channel axis; removing channels would change it")
            return
        self.chan[node] = _Chan(c.axis if keep else c.axis - sum(d < c.axis for d in dims), c.ids)

    def reshape(self, node: fx.Node) -> None:
        c = self.tracked(node.args[0])
        if not isinstance(c, _Chan):
            return
        s_in, s_out = _shape(node.args[0]), _shape(node)
        before = math.prod(s_in[: c.axis])
        for b in (k for k in range(len(s_out)) if math.prod(s_out[:k]) == before):
            for k in range(c.axis + 1, len(s_in) + 1):  # the channel axis, possibly merged with the axes after it
                if math.prod(s_in[c.axis:k]) == s_out[b]:
                    block = math.prod(s_in[c.axis + 1:k])
                    self.chan[node] = _Chan(b, tuple(i for i in c.ids for _ in range(block)))
                    return
        self.pin_chan(c, node, "reshape splits the channel axis (e.g. into attention heads) or merges it with a "
                               "leading axis; head pruning is not implemented, the group is kept")

    def permute(self, node: fx.Node) -> None:
        c = self.tracked(node.args[0])
        if not isinstance(c, _Chan):
            return
        rank = len(_shape(node.args[0]))
        if node.target is aten.permute.default:
            order = [d % rank for d in node.args[1]]
        else:
            d0, d1 = (node.args[1] % rank, node.args[2] % rank) if node.target is aten.transpose.int else (0, 1)
            order = list(range(rank))
            order[d0], order[d1] = order[d1], order[d0]
        self.chan[node] = _Chan(order.index(c.axis), c.ids)

    def cat(self, node: fx.Node) -> None:
        tensors = node.args[0]
        rank = len(_shape(node))
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
        chans = [self.tracked(t) for t in tensors]
        axes = {c.axis for c in chans if isinstance(c, _Chan)}
        if not axes:
            return
        if axes == {dim}:
            ids = tuple(i for t in tensors for i in self.input_chan(t, dim, "concatenation").ids)
            self.chan[node] = _Chan(dim, ids)
        elif len(axes) == 1 and all(isinstance(c, _Chan) for c in chans):  # cat along another axis: shared channels
            for c in chans[1:]:
                for i, j in zip(chans[0].ids, c.ids, strict=False):
                    self.union(i, j)
            self.chan[node] = chans[0]
        else:
            for c in chans:
                self.pin_chan(c, node, "concatenation mixes channel layouts")

    def split(self, node: fx.Node) -> None:
        c = self.tracked(node.args[0])
        if not isinstance(c, _Chan):
            return
        rank = len(_shape(node.args[0]))
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % rank
        pieces = [tuple(v.shape) for v in node.meta["val"]]
        if dim != c.axis:
            self.chan[node] = [c] * len(pieces)
            return
        sizes = [p[dim] for p in pieces]
        if len(set(sizes)) != 1:
            self.pin_chan(c, node, "split into unequal channel sizes, which the model's code fixes")
            return
        size = sizes[0]
        for j in range(1, len(sizes)):
            for r in range(size):
                self.union(c.ids[r], c.ids[j * size + r])
        self.chan[node] = [_Chan(dim, c.ids[j * size:(j + 1) * size]) for j in range(len(sizes))]

    def slice_select(self, node: fx.Node) -> None:
        c = self.tracked(node.args[0])
        if not isinstance(c, _Chan):
            return
        rank = len(_shape(node.args[0]))
        dim = node.args[1] % rank
        if dim == c.axis:
            if node.target is aten.slice.Tensor and _shape(node)[dim] == len(c.ids):
                self.chan[node] = c
            else:
                self.pin_chan(c, node, "slicing/indexing of channels; its bounds are fixed in the model's code")
            return
        self.chan[node] = _Chan(c.axis - (node.target is aten.select.int and dim < c.axis), c.ids)

    def norm_over(self, node: fx.Node) -> None:
        c = self.tracked(node.args[0])
        if not isinstance(c, _Chan):
            return
        rank = len(_shape(node.args[0]))
        normalized = (range(rank - len(node.args[1]), rank) if node.target is aten.layer_norm.default
                      else range(1, rank))
        if c.axis in normalized:
            self.pin_chan(c, node, f"{node.target} normalizes over the channels; removing some changes every output")
        else:
            self.chan[node] = c

    def pad(self, node: fx.Node) -> None:
        c = self.tracked(node.args[0])
        if not isinstance(c, _Chan):
            return
        rank = len(_shape(node.args[0]))
        padded = range(rank - len(node.args[1]) // 2, rank)
        if c.axis in padded:
            self.pin_chan(c, node, "padding of the channel axis")
        else:
            self.chan[node] = c

    def collect(self) -> DependencyGraph:
        classes: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            classes.setdefault(self.find(i), []).append(i)
        by_producers: dict[tuple[str, ...], list[tuple[tuple[Member, ...], list[str]]]] = {}
        for elements in classes.values():
            members = tuple(sorted(m for i in elements for m in self.members[i]))
            producers = tuple(sorted({m.module for m in members if m.role is Role.OUT}))
            if not producers:
                continue
            reasons = sorted({self.pin[i] for i in elements if i in self.pin})
            by_producers.setdefault(producers, []).append((members, reasons))
        groups = []
        for gid, (producers, entries) in enumerate(sorted(by_producers.items())):
            entries.sort(key=lambda e: e[0])
            reasons = sorted({r for _, rs in entries for r in rs})
            groups.append(Group(gid, producers, [m for m, _ in entries], reasons))
        return DependencyGraph(groups, self.modules, list(self.declines.values()), self.first_producer)


def analyze_dependencies(gm: fx.GraphModule, model: nn.Module, example_inputs: tuple) -> DependencyGraph:
    """Channel groups of ``model``, captured as ``gm`` (get_attr targets are ``model``'s parameter paths).
    Shapes come from the capture's metadata; a graph with nodes lacking it is shape-propagated first."""
    if any("val" not in n.meta and "tensor_meta" not in n.meta for n in gm.graph.nodes
           if n.op in ("placeholder", "call_function")):
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    return _Analysis(gm, model).run()

