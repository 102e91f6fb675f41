"""Small helpers shared by passes: attribute access on GraphModules, op matching, storage aliasing."""
from __future__ import annotations

import operator
import re
from typing import TypeGuard

import torch
from torch import fx


def get_attr_value(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def constant_of(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, or None if ``node`` is not a constant."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = get_attr_value(gm, node.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def add_constant(gm: fx.GraphModule, hint: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
    """Register ``value`` as a new parameter under a fresh flat name and return a get_attr node for it."""
    base = re.sub(r"[^0-9a-zA-Z_]", "_", hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_parameter(name, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def is_op(node, *targets) -> TypeGuard[fx.Node]:
    """``node`` is an fx node calling one of ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of an ATen call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def first_get_attr_position(gm: fx.GraphModule) -> fx.Node:
    """A node before which new get_attr nodes can be inserted (the first node of the graph)."""
    return next(iter(gm.graph.nodes))


def delete_unused_attributes(gm: fx.GraphModule) -> int:
    """Remove parameters/buffers no get_attr node reads, then empty submodules that no node calls or
    reads. Tensors of a module that a node calls, or reads whole (higher-order ops such as
    ``torch.cond`` read their branch GraphModules with get_attr), are that module's and stay.
    Returns the count of tensors removed."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used_prefixes = {u.rsplit(".", 1)[0] for u in used if "." in u}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    removed = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used or any(name.startswith(m + ".") for m in used | called):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
            removed += 1
        elif attr in owner._buffers:
            del owner._buffers[attr]
            removed += 1
    for name, mod in sorted(gm.named_modules(), key=lambda kv: -kv[0].count(".")):
        if name and name not in called and name not in used and name not in used_prefixes and not any(
                u.startswith(name + ".") for u in used | called):
            if not any(True for _ in mod.parameters()) and not any(True for _ in mod.buffers()):
                owner_path, _, attr = name.rpartition(".")
                owner = gm.get_submodule(owner_path) if owner_path else gm
                if attr in owner._modules:
                    del owner._modules[attr]
    return removed


def _alias_source(node: fx.Node) -> fx.Node | None:
    """The input ``node``'s result may share storage with (views, in-place results, getitem of
    split-like results), or None when it is a fresh tensor."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        src = node.args[0]
        return src if isinstance(src, fx.Node) and _alias_source(src) is not None else None
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None or not node.args:
        return None
    ret = schema.returns[0].alias_info
    for a, value in zip(schema.arguments, node.args, strict=False):
        if a.alias_info is not None and a.alias_info.before_set & ret.before_set and isinstance(value, fx.Node):
            return value
    return None


def alias_roots(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Each node → the root of its storage (the fresh tensor its chain of aliases starts from)."""
    root: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        src = _alias_source(n)
        root[n] = root.get(src, src) if src is not None else n
    return root
