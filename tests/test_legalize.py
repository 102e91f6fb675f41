"""Legalization rewrites: exact ones equal the original in float64, approximations stay within their
declared error (random and adversarial inputs), int8 lookup tables are bit-exact with `graphopt.qref`,
and every pass is idempotent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import graphopt
from graphopt import qref
from graphopt.passes import approximate_activations as approx
from graphopt.passes.base import PassContext, Property
from graphopt.passes.capture import capture
from graphopt.passes.legalization import legalization_passes, run_legalization, unfit_nodes
from graphopt.targets import Runtime, TargetSpec
from graphopt.targets.opset import OperatorSet, OpRule, op_kind

BROAD = ("conv2d", "linear", "matmul", "add", "sub", "mul", "div", "relu", "clamp", "mean", "rsqrt", "softmax",
         "where", "sum", "gt", "any", "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d", "hardtanh", "relu6",
         "hardswish", "hardsigmoid", "layer_norm", "scaled_dot_product_attention", "gelu", "silu", "sigmoid", "tanh")


def spec_with(*removed: str, conv: OpRule | None = None, approximating: bool = False) -> TargetSpec:
    """A host-runnable float64-capable target whose operator set lacks ``removed`` kinds."""
    rules = [OpRule(k) for k in BROAD if k not in removed and not (conv and k == "conv2d")]
    ops = OperatorSet("test", tuple(rules) + ((conv,) if conv else ()), dtypes={"float32", "float64", "bool", "int64"})
    return TargetSpec(name="legalize-test", description="test", tvm_target={"kind": "llvm"},
                      runtime=Runtime.TVM_VM_NATIVE, ops=ops)


def legalize(model: nn.Module, x: tuple, spec: TargetSpec, approximate: bool = False):
    gm = capture(model.eval(), x).graph_module
    ctx = PassContext(x, spec, {Property.ATEN, Property.INFERENCE})
    gm, records, legalized, unfit = run_legalization(gm, ctx, approximate=approximate)
    return gm, records, legalized, unfit, ctx


def kinds(gm) -> set[str]:
    return {op_kind(n) for n in gm.graph.nodes if op_kind(n)}


class Fn(nn.Module):
    def __init__(self, fn, *modules):
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(modules)

    def forward(self, *xs):
        return self.fn(self.mods, *xs)


def conv(cin, cout, k, **kw):
    return nn.Conv2d(cin, cout, k, **kw).double()


# (id, model, input shape, kinds removed from the set, conv rule, kind that must disappear, rewrite name)
EXACT = [
    ("hardtanh", Fn(lambda m, x: F.hardtanh(x, -2.0, 3.0)), (2, 3, 5, 5), ("hardtanh",), None, "hardtanh",
     "hardtanh → clamp"),
    ("relu6", Fn(lambda m, x: F.relu6(x)), (2, 3, 5, 5), ("hardtanh", "relu6"), None, "relu6", "relu6 → clamp"),
    ("relu-to-clamp", Fn(lambda m, x: torch.relu(x)), (2, 8), ("relu",), None, "relu", "relu → clamp"),
    ("clamp-to-relu", Fn(lambda m, x: torch.clamp(x, min=0.0)), (2, 8), ("clamp",), None, "clamp",
     "clamp(x, 0) → relu"),
    ("hardsigmoid-div", Fn(lambda m, x: F.hardsigmoid(x)), (4, 16), ("hardsigmoid",), None, "hardsigmoid",
     "hardsigmoid → clamp(x + 3, 0, 6) / 6"),
    ("hardsigmoid-mul", Fn(lambda m, x: F.hardsigmoid(x)), (4, 16), ("hardsigmoid", "div"), None, "hardsigmoid",
     "hardsigmoid → clamp(x + 3, 0, 6) · ⅙"),
    ("hardswish", Fn(lambda m, x: F.hardswish(x)), (4, 16), ("hardswish",), None, "hardswish",
     "hardswish → x · clamp(x + 3, 0, 6) / 6"),
    ("grouped", Fn(lambda m, x: m[0](x), conv(8, 12, 3, padding=1, groups=4)), (2, 8, 6, 6), (),
     OpRule("conv2d", grouped=False), None, "grouped conv → split convs + cat"),
    ("depthwise", Fn(lambda m, x: m[0](x), conv(4, 4, 3, stride=2, padding=1, groups=4)), (1, 4, 7, 7), (),
     OpRule("conv2d", depthwise=False), None, "grouped conv → split convs + cat"),
    ("dilated", Fn(lambda m, x: m[0](x), conv(3, 5, 3, padding=2, dilation=2)), (2, 3, 9, 9), (),
     OpRule("conv2d", dilation=False), None, "dilated conv → dense zero-inserted kernel"),
    ("kernel-pad", Fn(lambda m, x: m[0](x), conv(3, 5, (1, 3), stride=2, padding=(0, 1))), (1, 3, 8, 8), ("linear",),
     OpRule("conv2d", kernel_sizes={3}), None, "conv kernel → zero-padded allowed kernel"),
    ("conv1x1-to-linear", Fn(lambda m, x: m[0](x), conv(6, 4, 1, stride=2)), (2, 6, 5, 5), (),
     OpRule("conv2d", kernel_sizes={3}), None, "1×1 conv → linear"),
    ("linear-to-conv", Fn(lambda m, x: m[0](x), nn.Linear(6, 5).double()), (2, 3, 6), ("linear",), None, "linear",
     "linear → 1×1 conv"),
    ("avgpool", Fn(lambda m, x: F.avg_pool2d(x, 3, 2, 1)), (1, 4, 9, 9), ("avg_pool2d",), None, "avg_pool2d",
     "avg-pool → depthwise conv"),
    ("adaptive-to-pool", Fn(lambda m, x: F.adaptive_avg_pool2d(x, 2)), (1, 4, 8, 8), ("adaptive_avg_pool2d",), None,
     "adaptive_avg_pool2d", "adaptive avg-pool → avg-pool"),
    ("adaptive-to-conv", Fn(lambda m, x: F.adaptive_avg_pool2d(x, 1)), (1, 4, 6, 6),
     ("adaptive_avg_pool2d", "avg_pool2d"), None, "adaptive_avg_pool2d", "adaptive avg-pool → depthwise conv"),
    ("mean", Fn(lambda m, x: x.mean((2, 3))), (2, 4, 5, 5), ("mean",), None, "mean", "spatial mean → depthwise conv"),
    ("layer-norm", Fn(lambda m, x: m[0](x), nn.LayerNorm(16).double()), (2, 5, 16), ("layer_norm",), None,
     "layer_norm", "layer norm → mean, sub, mul, rsqrt, add"),
    ("attention", Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v)), None,
     ("scaled_dot_product_attention",), None, "scaled_dot_product_attention", "attention → matmul, softmax"),
    ("attention-causal", Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)),
     None, ("scaled_dot_product_attention",), None, "scaled_dot_product_attention", "attention → matmul, softmax"),
    ("attention-bool-mask", Fn(lambda m, q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=(q.sum(-1, keepdim=True) > -1.0).expand(-1, -1, -1, k.shape[-2]))), None,
     ("scaled_dot_product_attention",), None, "scaled_dot_product_attention", "attention → matmul, softmax"),
    ("attention-float-mask", Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=q[..., :6] * 0.1)),
     None, ("scaled_dot_product_attention",), None, "scaled_dot_product_attention", "attention → matmul, softmax"),
]


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    if shape is None:  # attention: q, k, v of (batch, heads, tokens, dim)
        return tuple(torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 5,)


@pytest.mark.parametrize("case", EXACT, ids=[c[0] for c in EXACT])
def test_exact_rewrite_equals_original_in_float64(case):
    _, model, shape, removed, conv_rule, gone, rewrite = case
    spec = spec_with(*removed, conv=conv_rule)
    gm, records, legalized, unfit, ctx = legalize(model, _inputs(shape, 0), spec)
    assert unfit == [], unfit
    assert rewrite in {r["rewrite"] for r in legalized} and all(r["exact"] and r["max_error"] == 0 for r in legalized)
    if gone:
        assert gone not in kinds(gm)
    for seed in range(4):
        xs = _inputs(shape, seed)
        torch.testing.assert_close(gm(*xs), model(*xs), rtol=1e-12, atol=1e-12)
    for p in legalization_passes():
        assert not p.run(gm, ctx).modified, f"{p.name} is not idempotent"


def test_rewrites_compose_grouped_dilated_conv_into_3x3_only_set():
    model = Fn(lambda m, x: m[0](x), conv(4, 4, 2, padding=1, dilation=2, groups=2))
    spec = spec_with(conv=OpRule("conv2d", kernel_sizes={3}, grouped=False, dilation=False))
    gm, _, legalized, unfit, _ = legalize(model, _inputs((1, 4, 8, 8), 0), spec)
    assert unfit == []
    assert {r["rewrite"] for r in legalized} == {"grouped conv → split convs + cat",
                                                 "dilated conv → dense zero-inserted kernel"}
    x = _inputs((1, 4, 8, 8), 1)
    torch.testing.assert_close(gm(*x), model(*x), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- approximations

def adversarial() -> torch.Tensor:
    """Clamp boundaries, saturation regions, huge and tiny magnitudes, signed zeros, subnormals."""
    edges = torch.tensor([approx.TANH_CLAMP, 2 * approx.TANH_CLAMP, approx.ERF_CLAMP * 2 ** 0.5, 10.0, 20.0, 15.8,
                          5.66, 88.7, 1e4, 3e38, 1e-45, 1e-38, 0.0], dtype=torch.float64)
    near = (edges[:, None] + torch.linspace(-0.05, 0.05, 201, dtype=torch.float64)).flatten()
    return torch.cat([near, -near, torch.tensor([-0.0], dtype=torch.float64)]).float()


@pytest.mark.parametrize("rewrite", approx.REWRITES, ids=[r.name.split(" →")[0] for r in approx.REWRITES])
def test_approximation_within_declared_error(rewrite):
    g = torch.Generator().manual_seed(0)
    random = torch.cat([torch.randn(200_000, generator=g) * s for s in (0.5, 3.0, 30.0)])
    assert approx.error(rewrite, random) <= rewrite.declared_error
    assert approx.error(rewrite, adversarial()) <= rewrite.declared_error
    assert 0 < approx.measured_error(rewrite) <= rewrite.declared_error


class Activations(nn.Module):
    def forward(self, x):
        return F.gelu(x) + F.gelu(x, approximate="tanh") + F.silu(x) + torch.sigmoid(x) + torch.tanh(x)


def test_approximations_only_with_approximate_true_and_reported():
    x = (torch.randn(4, 64) * 4,)
    spec = spec_with("gelu", "silu", "sigmoid", "tanh")
    gm, records, legalized, unfit, _ = legalize(Activations(), x, spec)
    assert {u.what.split(":")[0] for u in unfit} == {"gelu", "gelu_1", "silu", "sigmoid", "tanh"}
    assert all("approximate=True" in u.hint and "max error" in u.hint for u in unfit)
    gm, records, legalized, unfit, _ = legalize(Activations(), x, spec, approximate=True)
    assert unfit == [] and len(legalized) == 5
    assert all(not r["exact"] and 0 < r["max_error"] <= 3e-6 for r in legalized)
    assert kinds(gm) <= {"clamp", "add", "mul", "div"}
    for xs in (torch.randn(4, 64) * 10, adversarial()[:256].reshape(4, 64)):
        want = Activations()(xs.double())
        got = gm(xs.float()).double()
        assert float(((got - want).abs() / want.abs().clamp_min(1)).max()) <= 5 * 3e-6  # five terms summed


# ---------------------------------------------------------------- int8 lookup tables

class Int8Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return F.gelu(y) + torch.sigmoid(y) + F.silu(y) + torch.tanh(y)


def test_int8_activations_are_exact_lookup_tables_on_cortex_m4():
    torch.manual_seed(0)
    model, x = Int8Activations().eval(), torch.randn(1, 3, 8, 8)
    qm = graphopt.quantize(model, (x,), calibration=[torch.randn(4, 3, 8, 8) for _ in range(3)])
    ig = graphopt.to_integer(qm, (x,))
    assert sum(op_kind(n) == "qlut" for n in ig.graph.nodes) == 4
    m4 = graphopt.get_target("cortex-m4")
    assert [u.what for u in unfit_nodes(ig, m4.ops)] == []  # no approximation needed in int8
    for seed in range(3):
        xi = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2
        assert np.array_equal(ig(xi).numpy(), qref.run(ig, (xi,))[0])
    scheme = graphopt.QuantScheme(weights=4, keep_first_last_8bit=False)
    q4 = graphopt.quantize(model, (x,), calibration=[x], scheme=scheme)
    assert unfit_nodes(graphopt.to_integer(q4, (x,)), m4.ops) == []  # packed 4-bit weights (unpack_bits) fit too
    result = graphopt.check(qm, (x,), target="cortex-m4")
    assert result.approximations == [] and result.kinds.get("qlut") == 4, str(result)
    assert not [u for u in result.unsupported if not u.what.startswith("operator ")], str(result)  # op set: fits
