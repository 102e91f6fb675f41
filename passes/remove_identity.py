"""Remove operations that are the identity at inference: eval dropout, copies, no-op views and
arithmetic. Each rule is data: an op, a predicate on its arguments, and the algebra it relies on.

Refuses: anything that changes dtype, shape, or value (e.g. dropout with ``train=True``), and
nodes whose output is a graph output (the output node would then alias an input, so the node
is kept only when its input is also an input placeholder). Declined, with the reason: a node
whose storage (or its input's) an in-place op that `Functionalize` kept still writes — removing a
copy there would let the write reach the original.

Removing a copy changes strides, not values: ``x.transpose(1, 2).contiguous().view(...)`` (a
channel shuffle) would then view a non-contiguous tensor, which PyTorch refuses. So every
``view`` downstream of a removed node whose strides differ from its input's becomes ``reshape``
(equal values; a view where strides allow it).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from graphopt.passes.base import Decline, GraphPass, PassContext, PassResult, Property
from graphopt.passes.graph import alias_roots, arg

aten = torch.ops.aten
_INT64_MAX = 2**63 - 1


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_shape_dtype(node: fx.Node) -> bool:
    src, out = _val(node.args[0]), _val(node)
    return src is not None and out is not None and src.shape == out.shape and src.dtype == out.dtype


def _scalar(node: fx.Node, value) -> bool:
    """Second operand is the Python number ``value`` and the op keeps shape and dtype."""
    other = node.args[1] if len(node.args) > 1 else None
    return (isinstance(other, (int, float)) and not isinstance(other, bool) and other == value
            and _same_shape_dtype(node))


def _full_slice(node: fx.Node) -> bool:
    start, end, step = arg(node, 2, "start", 0), arg(node, 3, "end", _INT64_MAX), arg(node, 4, "step", 1)
    src = _val(node.args[0])
    dim = arg(node, 1, "dim", 0)
    full_end = end is None or end >= _INT64_MAX or (src is not None and end >= src.shape[dim])
    return start in (0, None) and step == 1 and full_end


@dataclass(frozen=True)
class IdentityRule:
    op: object
    applies: Callable[[fx.Node], bool]
    algebra: str


RULES: tuple[IdentityRule, ...] = (
    IdentityRule(aten.dropout.default, lambda n: arg(n, 2, "train") is False, "dropout(x, p, train=False) = x"),
    IdentityRule(aten.feature_dropout.default, lambda n: arg(n, 2, "train") is False,
                 "feature_dropout(x, p, False) = x"),
    IdentityRule(aten.alpha_dropout.default, lambda n: arg(n, 2, "train") is False, "alpha_dropout(x, p, False) = x"),
    IdentityRule(aten.clone.default, lambda n: True, "clone(x) = x  (values; graphs are functional)"),
    IdentityRule(aten.alias.default, lambda n: True, "alias(x) = x"),
    IdentityRule(aten.detach.default, lambda n: True, "detach(x) = x  (inference)"),
    IdentityRule(aten.contiguous.default, lambda n: True, "contiguous(x) = x  (values)"),
    IdentityRule(aten.to.dtype, _same_shape_dtype, "to(x, x.dtype) = x"),
    IdentityRule(aten._to_copy.default, lambda n: _same_shape_dtype(n) and not n.kwargs.get("device"),
                 "_to_copy(x) = x"),
    IdentityRule(aten.view.default, _same_shape_dtype, "view(x, x.shape) = x"),
    IdentityRule(aten.reshape.default, _same_shape_dtype, "reshape(x, x.shape) = x"),
    IdentityRule(aten.expand.default, _same_shape_dtype, "expand(x, x.shape) = x"),
    IdentityRule(aten.flatten.using_ints, _same_shape_dtype, "flatten(x) = x when it merges only size-1/no dims"),
    IdentityRule(aten.permute.default, lambda n: list(n.args[1]) == sorted(n.args[1]), "permute(x, 0..n-1) = x"),
    IdentityRule(aten.slice.Tensor, _full_slice, "x[..., 0:len:1] = x"),
    IdentityRule(aten.mul.Scalar, lambda n: _scalar(n, 1), "x * 1 = x"),
    IdentityRule(aten.mul.Tensor, lambda n: _scalar(n, 1), "x * 1 = x"),
    IdentityRule(aten.div.Scalar, lambda n: _scalar(n, 1), "x / 1 = x"),
    IdentityRule(aten.div.Tensor, lambda n: _scalar(n, 1) and not n.kwargs.get("rounding_mode"), "x / 1 = x"),
    IdentityRule(aten.add.Scalar, lambda n: _scalar(n, 0), "x + α·0 = x"),
    IdentityRule(aten.add.Tensor, lambda n: _scalar(n, 0), "x + α·0 = x"),
    IdentityRule(aten.sub.Scalar, lambda n: _scalar(n, 0), "x − α·0 = x"),
    IdentityRule(aten.sub.Tensor, lambda n: _scalar(n, 0), "x − α·0 = x"),
    IdentityRule(aten.pad.default, lambda n: all(p == 0 for p in n.args[1]), "pad(x, 0...) = x"),
    IdentityRule(aten.constant_pad_nd.default, lambda n: all(p == 0 for p in n.args[1]), "pad(x, 0...) = x"),
)
# Export-time dtype/device assertions: value-free (no users). graphopt validates inputs itself
# and shapes are static, so they only cost time. Erased, counted under this name.
_ASSERTIONS = {aten._assert_tensor_metadata.default}
_ASSERTION_ALGEBRA = "assert_tensor_metadata(x) = ()  (checked statically)"
_BY_OP: dict[object, list[IdentityRule]] = {}
for _r in RULES:
    _BY_OP.setdefault(_r.op, []).append(_r)


class RemoveIdentity(GraphPass):
    name = "remove-identity"
    requires = frozenset({Property.ATEN, Property.INFERENCE})
    establishes = frozenset({Property.NO_IDENTITY})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        removed: dict[str, int] = {}
        declined: list[Decline] = []
        restrided: list[fx.Node] = []  # users of removed nodes that changed strides
        output = next(n for n in gm.graph.nodes if n.op == "output")
        roots = alias_roots(gm.graph)
        written = {roots[n.args[0]] for n in gm.graph.nodes if _writes(n) and isinstance(n.args[0], fx.Node)}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            if node.target in _ASSERTIONS and not node.users:
                gm.graph.erase_node(node)
                removed[_ASSERTION_ALGEBRA] = removed.get(_ASSERTION_ALGEBRA, 0) + 1
                continue
            rule = next((r for r in _BY_OP.get(node.target, ()) if r.applies(node)), None)
            if rule is None:
                continue
            src = node.args[0]
            if output in node.users and src.op == "placeholder":
                continue  # output would alias an input; keep the copy
            if roots[node] in written or roots[src] in written:
                declined.append(Decline.at(self.name, node, f"{rule.algebra}, but an in-place op writes this storage "
                                           "afterwards; removing the node would let it write the original"))
                continue
            if not _same_strides(node):
                restrided += node.users
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            removed[rule.algebra] = removed.get(rule.algebra, 0) + 1
        reshaped = _views_to_reshapes(restrided)
        if removed:
            gm.graph.lint()
            gm.recompile()
        stats = {"removed": sum(removed.values()), "by_rule": removed}
        if reshaped:
            stats["views_made_reshapes"] = reshaped
        return PassResult(gm, bool(removed), stats, tuple(declined))


def _writes(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return bool(schema is not None and node.args and schema.arguments
                and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write)


def _same_strides(node: fx.Node) -> bool:
    src, out = _val(node.args[0]), _val(node)
    return src is not None and out is not None and src.shape == out.shape and src.stride() == out.stride()


def _views_to_reshapes(starts: list[fx.Node]) -> int:
    """Every ``view`` reachable from ``starts`` becomes ``reshape``: its input's strides may have changed."""
    seen, todo, count = set(), list(starts), 0
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is aten.view.default:
            n.target = aten.reshape.default
            count += 1
        todo.extend(n.users)
    return count
