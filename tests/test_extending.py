"""docs/architecture.md's recipes, done from this file alone: a new pass and a new target, compiled
end to end without touching graphopt.

The pass (`FuseScaleChain`: ``(x · a) · b`` → ``x · (a·b)`` for scalar a, b) is checked against
the graph it rewrote in float64 on several inputs; the target (a host CPU whose operator set has no
ReLU6, so legalization rewrites it into a clamp) is registered with `register_target` and compiled
with ``verify=True``, which runs the artifact and compares it with PyTorch.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

import graphopt
from graphopt.passes.base import GraphPass, PassContext, PassResult, Property
from graphopt.passes.capture import capture
from graphopt.passes.manager import PassManager, default_passes, max_rel_error
from graphopt.targets import Runtime, TargetSpec, get_target, register_target
from graphopt.targets.opset import OperatorSet, OpRule

aten = torch.ops.aten


class FuseScaleChain(GraphPass):
    """(x · a) · b → x · (a·b) for Python-scalar a and b, when x · a has no other user."""

    name = "fuse-scale-chain"
    requires = frozenset({Property.ATEN})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        fused = 0
        for node in list(gm.graph.nodes):
            inner = node.args[0] if node.target is aten.mul.Tensor else None
            if (isinstance(inner, fx.Node) and inner.target is aten.mul.Tensor and len(inner.users) == 1
                    and all(isinstance(n.args[1], (int, float)) for n in (node, inner))):
                node.args = (inner.args[0], operator.mul(inner.args[1], node.args[1]))
                gm.graph.erase_node(inner)
                fused += 1
        if fused:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(fused), {"fused": fused})


TOY = TargetSpec(
    name="toy-dsp", description="a host CPU with a DSP-like operator set (no ReLU6: clamp instead)",
    tvm_target=dict(get_target("host").tvm_target), runtime=Runtime.TVM_VM_NATIVE, vector_bits=128,
    ops=OperatorSet("toy", rules=tuple(OpRule(k) for k in ("conv2d", "linear", "mul", "add", "clamp", "mean"))))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x))) * 0.5 * 4.0
        return self.fc(y.mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Scaled()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model.eval()


def test_a_pass_from_a_test_file_is_exact_in_float64():
    model = _model().double()
    args = (torch.randn(2, 3, 9, 9, dtype=torch.float64),)
    gm = capture(model, args).graph_module
    inputs = [torch.randn(2, 3, 9, 9, dtype=torch.float64) * s for s in (1.0, 10.0, 0.1)]
    reference = [gm(x) for x in inputs]
    ctx = PassContext(args, None, {Property.ATEN})
    rewritten, [record] = PassManager([FuseScaleChain()]).run(gm, ctx)
    assert record.modified and record.stats == {"fused": 1}
    assert sum(n.target is aten.mul.Tensor for n in rewritten.graph.nodes) == 1
    for x, want in zip(inputs, reference, strict=True):
        assert max_rel_error(rewritten(x), want) < 1e-14
    again = FuseScaleChain().run(rewritten, ctx)
    assert not again.modified  # honest `modified`


def test_a_target_and_a_pass_from_a_test_file_compile_end_to_end():
    register_target(TOY, replace=True)
    model, x = _model(), torch.randn(1, 3, 16, 16)
    cm = graphopt.compile(model, (x,), "toy-dsp", passes=[*default_passes(), FuseScaleChain()], verify=True,
                          progress=False)
    report = cm.report
    assert report.verification["max_rel_error"] <= 1e-4
    assert next(p for p in report.passes if p.name == "fuse-scale-chain").stats == {"fused": 1}
    assert [r["rewrite"] for r in report.legalized] == ["hardtanh → clamp"]
    with torch.no_grad():
        assert max_rel_error(cm(x), model(x)) <= 1e-4
