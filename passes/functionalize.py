"""Turn in-place ATen ops into their functional forms, so every later pass sees one canonical graph.

torch.export keeps what the user wrote: ``ReLU(inplace=True)`` is ``relu_``, ``out += identity``
is ``add_``, ``x.mul_(s)`` is ``mul_``, ``Dropout(inplace=True)`` is ``dropout_``. An in-place node
``y = op_(x, ...)`` becomes ``y = op(x, ...)`` (the overload of the same name without the trailing
underscore and the same arguments), and every later reader of ``x`` reads ``y`` instead: after the
mutation ``x`` holds ``y``'s value. The result keeps ``x``'s dtype (an in-place op does not
promote; a cast is inserted where the functional op would).

Declined (the in-place node stays, listed with the reason): the mutated tensor is read after the
op through another alias created before it (a view of it, its base, or a sibling view: fx cannot
redirect those without scatter ops); it is a parameter or buffer (state the compiled model does
not keep); or the op has no functional overload with the same arguments. Mutating a graph input
is rewritten: the outputs are the same, the caller's tensor is no longer written (stats count it).
"""
from __future__ import annotations

import functools

import torch
from torch import fx

from graphopt.passes.base import Decline, GraphPass, PassContext, PassResult, Property
from graphopt.passes.graph import alias_roots

aten = torch.ops.aten


def _writes_first_argument_only(schema) -> bool:
    args = schema.arguments
    first = args[0].alias_info if args else None
    return (first is not None and first.is_write and len(schema.returns) == 1
            and not any(a.alias_info is not None and a.alias_info.is_write for a in args[1:]))


@functools.cache
def functional_form(op) -> torch._ops.OpOverload | None:
    """``aten.relu_.default`` → ``aten.relu.default``: the overload with the same arguments that
    returns a new tensor, or None when ``op`` is not an in-place op of that kind."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    schema = op._schema
    namespace, _, name = schema.name.partition("::")
    if not name.endswith("_") or name.startswith("_") or not _writes_first_argument_only(schema):
        return None
    packet = getattr(getattr(torch.ops, namespace), name[:-1], None)
    functional = getattr(packet, op._overloadname, None) if packet is not None else None
    if functional is None:
        return None
    fs = functional._schema
    same = len(fs.arguments) == len(schema.arguments) and len(fs.returns) == 1 and all(
        str(a.type) == str(b.type) and a.kwarg_only == b.kwarg_only
        for a, b in zip(schema.arguments, fs.arguments, strict=True))
    return functional if same else None


def _functional_val(functional, node: fx.Node):
    """The functional op's result on the fake tensors export recorded for the node's inputs, or None."""
    args, kwargs = fx.node.map_aggregate((node.args, node.kwargs),
                                         lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a)
    try:
        return functional(*args, **kwargs)
    except Exception:  # noqa: BLE001  no recorded metadata to compute with: no dtype/shape check possible
        return None


class Functionalize(GraphPass):
    name = "functionalize"
    requires = frozenset({Property.ATEN})
    establishes = frozenset({Property.FUNCTIONAL})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        rewritten: dict[str, int] = {}
        declined: list[Decline] = []
        inputs_no_longer_written = 0
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            functional = functional_form(node.target)
            if functional is None:
                if _mutates(node):
                    declined.append(Decline.at(self.name, node, f"{node.target} has no functional overload with "
                                               "the same arguments; it stays in place"))
                continue
            reason = self._why_not(graph, node)
            if reason:
                declined.append(Decline.at(self.name, node, reason))
                continue
            x = node.args[0]
            inputs_no_longer_written += alias_roots(graph)[x].op == "placeholder"
            self._rewrite(graph, node, functional)
            key = f"{node.target._schema.name.split('::')[1]} → {functional._schema.name.split('::')[1]}"
            rewritten[key] = rewritten.get(key, 0) + 1
        if rewritten:
            graph.lint()
            gm.recompile()
        stats = {"rewritten": sum(rewritten.values()), "by_op": rewritten, "kept_in_place": len(declined)}
        if inputs_no_longer_written:
            stats["inputs_no_longer_written"] = inputs_no_longer_written
        return PassResult(gm, bool(rewritten), stats, tuple(declined))

    @staticmethod
    def _why_not(graph: fx.Graph, node: fx.Node) -> str | None:
        x = node.args[0]
        if not isinstance(x, fx.Node):
            return "the mutated argument is not a graph value"
        order = {n: i for i, n in enumerate(graph.nodes)}
        roots = alias_roots(graph)
        root = roots[x]
        if root.op == "get_attr":
            return f"mutates parameter/buffer {root.target!r}, state a compiled model does not keep"
        here = order[node]
        for other, r in roots.items():
            if r is not root or other is x or other is node or order[other] > here:
                continue
            late = [u for u in other.users if order[u] > here]
            if late:
                return (f"the mutated tensor is also read after the op through its alias {other.name!r} "
                        f"(by {late[0].name!r}); rewriting it would need a scatter")
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            f_val = _functional_val(functional_form(node.target), node)
            if isinstance(f_val, torch.Tensor) and tuple(f_val.shape) != tuple(val.shape):
                return f"the functional form has shape {tuple(f_val.shape)}, the in-place result {tuple(val.shape)}"
        return None

    @staticmethod
    def _rewrite(graph: fx.Graph, node: fx.Node, functional) -> None:
        x = node.args[0]
        order = {n: i for i, n in enumerate(graph.nodes)}
        here = order[node]
        val = node.meta.get("val")
        with graph.inserting_before(node):
            new = graph.call_function(functional, node.args, node.kwargs)
            new._rename(functional._schema.name.split("::")[1])  # relu_ → relu, relu_1, ...
            new.meta = dict(node.meta)
            f_val = _functional_val(functional, node) if isinstance(val, torch.Tensor) else None
            if isinstance(f_val, torch.Tensor) and f_val.dtype != val.dtype:  # in-place keeps x's dtype
                cast = graph.call_function(aten.to.dtype, (new, val.dtype))
                cast.meta = dict(node.meta)
                new.meta["val"] = f_val
                result = cast
            else:
                result = new
        node.replace_all_uses_with(result)
        for user in [u for u in x.users if u is not new and order.get(u, -1) > here]:
            user.replace_input_with(x, result)
        graph.erase_node(node)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable
