"""The op taxonomy: what graphopt knows about each ATen / graphopt operator, in one place.

Passes, the pruning analysis, the cost model and operator sets all ask here instead of keeping
their own lists:

- `op_kind(node)`: the op name without overload or in-place suffix (``conv2d``, ``relu``,
  ``qconv2d``) — the vocabulary operator sets (`graphopt.targets.opset`) are written in;
  `DATA_MOVEMENT`, `CONV_KINDS`, `POOL_KINDS` are kinds.
- op groups (sets of ``OpOverload``s): `CONV` (with spatial rank), `LINEAR`, `CHANNELWISE`
  (unary, each element keeps its channel), `SPATIAL` (pools/upsampling: the channel axis stays),
  `BINARY`, `REDUCE`, `RESHAPE`, `SPLIT`, `MIXING` (ops that mix channels), `BATCH_NORMS`; and what
  quantization folds: `CLAMPS` (ops that only narrow a range, with the range), `ACTIVATIONS` and
  `SCALAR_ARITHMETIC` (lookup tables), `VIEWS`/`PASS_THROUGH`/`PADS`/`SPLITS` (int8 data movement),
  `SHARES_PARAMS`, `FUSES_CLAMP` (producers an activation's range folds into).
- cost: `op_cost(node)` — multiply-accumulates of one call and the precision they run at, from
  the shapes on the node (ShapeProp's ``tensor_meta``, else export's ``val``): ATen ops by
  `MAC_RULES` at their float dtype, graphopt's integer ops by the cost their definition states
  (`graphopt.qops.cost`: w8a8, w4a8, w1a1 …, and the logical size of packed operands); None for
  ops that do no MACs by convention (elementwise work, pooling).
- `conv_params(node, gm)`: kernel, groups, dilation and input channels of a convolution node.

Imports nothing of graphopt but the integer ops' definitions (`graphopt.qops`).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import fx

from graphopt import qops

aten = torch.ops.aten

# ---- kinds (op names, as operator sets spell them)

# kinds that only move or index data (no arithmetic)
DATA_MOVEMENT = frozenset({
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "permute", "transpose", "t", "squeeze", "unsqueeze",
    "expand", "slice", "select", "cat", "stack", "split", "split_with_sizes", "chunk", "unbind", "contiguous",
    "clone", "alias", "detach", "getitem", "pad", "constant_pad_nd",
})
CONV_KINDS = ("conv1d", "conv2d", "qconv2d")
POOL_KINDS = ("max_pool2d", "avg_pool2d")


def op_kind(node: fx.Node) -> str | None:
    """The kind of a ``call_function`` node (None for placeholders, get_attr and output)."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        return "getitem"
    name = str(getattr(node.target, "_opname", None) or getattr(node.target, "__name__", node.target))
    name = name.split(".")[0]
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


# ---- op groups (OpOverloads)

CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}  # → spatial rank
LINEAR = frozenset({aten.linear.default})
# unary: every output element depends on the input element at the same position (its channel kept)
CHANNELWISE = frozenset({
    aten.relu.default, aten.hardtanh.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default,
    aten.tanh.default, aten.hardswish.default, aten.hardsigmoid.default, aten.leaky_relu.default, aten.elu.default,
    aten.mish.default, aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten.neg.default, aten.abs.default, aten.exp.default, aten.sqrt.default,
    aten.rsqrt.default, aten.square.default, aten._to_copy.default, aten.to.dtype, aten.type_as.default,
    aten.clamp.default, aten.relu6.default, aten.softplus.default, aten.relu_.default, aten.hardtanh_.default,
    aten.silu_.default, aten.gelu_.default, aten.sigmoid_.default, aten.dropout_.default,
})
SPATIAL = frozenset({  # pooling and resampling: axis 1 (channels) stays in place
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default, aten.avg_pool1d.default,
    aten.avg_pool2d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default, aten.adaptive_max_pool2d.default,
    aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec,
})
BINARY = frozenset({aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
                    aten.minimum.default, aten.add_.Tensor, aten.sub_.Tensor, aten.mul_.Tensor, aten.div_.Tensor})
REDUCE = frozenset({aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default})
RESHAPE = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                     aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default})
SPLIT = frozenset({aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections})
MIXING = frozenset({aten.matmul.default, aten.mm.default, aten.bmm.default, aten.scaled_dot_product_attention.default,
                    aten.softmax.int, aten._softmax.default, aten.log_softmax.int})


# ---- quantization: what QDQ folding (passes/fold_qdq.py) and the quantizer (graphopt/quantization.py)
# treat alike: ops that narrow a range, elementwise ops that become lookup tables, data movement that
# shares its input's quantization parameters, and producers an activation's range folds into

# activations that only narrow the output range (lo, hi in real units; None = unbounded)
CLAMPS = {
    aten.relu.default: lambda n: (0.0, None),
    aten.relu6.default: lambda n: (0.0, 6.0),
    aten.hardtanh.default: lambda n: (float(n.args[1]) if len(n.args) > 1 else -1.0,
                                      float(n.args[2]) if len(n.args) > 2 else 1.0),
    aten.clamp.default: lambda n: (None if len(n.args) < 2 or n.args[1] is None else float(n.args[1]),
                                   None if len(n.args) < 3 or n.args[2] is None else float(n.args[2])),
}
# unary elementwise ops: a table of their 256 int8 results replaces them (→ qlut)
ACTIVATIONS = (aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.clamp.default,
               aten.hardswish.default, aten.hardsigmoid.default, aten.sigmoid.default, aten.tanh.default,
               aten.gelu.default, aten.silu.default, aten.elu.default, aten.leaky_relu.default, aten.mish.default,
               aten.softplus.default, aten.neg.default, aten.abs.default, aten.exp.default, aten.square.default)
# arithmetic that is elementwise in one tensor when its other operands are Python scalars (→ qlut)
SCALAR_ARITHMETIC = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor,
                     aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.rsub.Scalar, aten.pow.Tensor_Scalar)
VIEWS = (aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.permute.default,
         aten.squeeze.dims, aten.unsqueeze.default, aten.transpose.int, aten.contiguous.default,
         aten.clone.default, aten.slice.Tensor, aten._unsafe_view.default, aten.squeeze.dim, aten.t.default,
         aten.select.int)
PASS_THROUGH = (*VIEWS, aten.max_pool2d.default)  # commute with (s, z): they share their input's params
PADS = (aten.pad.default, aten.constant_pad_nd.default)  # int8 data movement; the pad value quantized once
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)  # items are slices
BATCH_NORMS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
SHARES_PARAMS = (aten.relu.default,)  # standalone: the quantizer gives its output its input's params (a clamp)
# producers a following relu/relu6/hardtanh/clamp folds into (the quantizer quantizes after the pair)
FUSES_CLAMP = (aten.conv2d.default, aten.linear.default, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor,
               aten.matmul.default, aten.mm.default, aten.bmm.default, aten.avg_pool2d.default,
               aten.adaptive_avg_pool2d.default, aten.mean.dim, aten.cat.default, *BATCH_NORMS)


# ---- cost

def shape(node) -> tuple[int, ...] | None:
    """The shape of the tensor ``node`` produces: ShapeProp's ``tensor_meta``, else export's ``val``."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    meta = meta if meta is not None else node.meta.get("val")
    dims = getattr(meta, "shape", None)
    return tuple(dims) if dims is not None and all(isinstance(d, int) for d in dims) else None  # not symbolic


def _numel(dims: tuple[int, ...] | None) -> int:
    return math.prod(dims) if dims is not None else 0


def _conv(n: fx.Node) -> int:  # out · (Cin/groups) · prod(kernel)
    w = shape(n.args[1])
    return _numel(shape(n)) * _numel(w[1:]) if w else 0


def _conv_transpose(n: fx.Node) -> int:  # every input element scatters Cout/groups · prod(kernel)
    w = shape(n.args[1])
    return _numel(shape(n.args[0])) * _numel(w[1:]) if w else 0


def _linear(n: fx.Node) -> int:  # out · in_features
    w = shape(n.args[1])
    return _numel(shape(n)) * w[-1] if w else 0


def _matmul(n: fx.Node) -> int:  # out · K, K = last dim of the first operand
    a = shape(n.args[0])
    return _numel(shape(n)) * a[-1] if a else 0


def _addmm(n: fx.Node) -> int:  # addmm(bias, a, b): out · K
    a = shape(n.args[1])
    return _numel(shape(n)) * a[-1] if a else 0


def _sdpa(n: fx.Node) -> int:  # QKᵀ and PV: 2 · B·H·L·S·D
    q, k = shape(n.args[0]), shape(n.args[1])
    return 2 * _numel(q) * k[-2] if q and k else 0


MAC_RULES: dict[object, Callable[[fx.Node], int]] = {
    aten.conv1d.default: _conv, aten.conv2d.default: _conv, aten.conv3d.default: _conv,
    aten.convolution.default: _conv,
    aten.conv_transpose1d.default: _conv_transpose, aten.conv_transpose2d.input: _conv_transpose,
    aten.linear.default: _linear,
    aten.matmul.default: _matmul, aten.mm.default: _matmul, aten.bmm.default: _matmul,
    aten.addmm.default: _addmm, aten.baddbmm.default: _addmm,
    aten.scaled_dot_product_attention.default: _sdpa,
}


_FLOAT_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _float_precision(node: fx.Node) -> str:
    meta = node.meta.get("tensor_meta")
    dtype = getattr(meta if meta is not None else node.meta.get("val"), "dtype", None)
    return _FLOAT_PRECISION.get(dtype, str(dtype).removeprefix("torch."))


def counts_macs(node: fx.Node) -> bool:
    """Whether `op_cost` has a rule for ``node`` (its MACs are read from shapes)."""
    return node.op == "call_function" and (node.target in MAC_RULES or node.target in qops.COSTS)


def op_cost(node: fx.Node) -> qops.OpCost | None:
    """What one call of ``node`` costs (see the module docstring); None for ops without a MAC rule."""
    if node.op != "call_function":
        return None
    stated = qops.cost(node)
    if stated is not None:
        return stated
    rule = MAC_RULES.get(node.target)
    return qops.OpCost(int(rule(node)), _float_precision(node)) if rule is not None else None


# ---- convolution parameters

def value(node, gm: fx.GraphModule) -> torch.Tensor | None:
    """The tensor (or fake tensor) a node produces: its ``val`` metadata, or the constant it reads."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return v
    if node.op == "get_attr":
        v = operator.attrgetter(node.target)(gm)
        return v if isinstance(v, torch.Tensor) else None
    return None


def conv_params(node: fx.Node, gm: fx.GraphModule) -> tuple[tuple, int, tuple, int] | None:
    """(kernel (kh, kw), groups, dilation, input channels) of a convolution node, or None if unknown."""
    kind = op_kind(node)
    w_i = 2 if kind == "qconv2d" else 1
    w = value(node.args[w_i], gm)
    if w is None:
        return None
    args = node.args[w_i:]  # weight, bias, stride, padding, dilation, groups
    nd = w.dim() - 2
    groups = int(args[5] if len(args) > 5 else node.kwargs.get("groups", 1))
    dilation = args[4] if len(args) > 4 else node.kwargs.get("dilation", 1)
    dilation = tuple(dilation) * (nd if len(tuple(dilation)) == 1 else 1) if isinstance(dilation, (list, tuple)) \
        else (int(dilation),) * nd
    kernel = tuple(w.shape[2:]) if nd == 2 else (1, int(w.shape[2]))
    return kernel, groups, dilation, int(w.shape[1]) * groups
