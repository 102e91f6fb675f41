"""In-place ops become functional right after capture: float64 oracles on code written as torchvision
writes it, aliasing (redirected readers, declined views of the mutated tensor), dtype, both capture
paths, and the quantized graph (no dropout, no in-place op)."""
import torch
import torch.nn.functional as F
from graphopt.passes.base import PassContext, Property
from graphopt.passes.functionalize import Functionalize, functional_form
from torch import fx, nn

import graphopt
from graphopt.capture import CaptureMethod, capture
from graphopt.torchvision_style import BasicBlock, conv1x1
from graphopt.zoo import recalibrate_bn

aten = torch.ops.aten


def _functionalize(records):
    return next(r for r in records if r.name == "functionalize")


def _in_place(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "_schema", None)
            is not None and n.target._schema.is_mutable]


def _assert_same_function(model, gm, shape, trials=4):
    """gm(x) == model(x) in float64 on several inputs; each side gets its own copy (in-place ops write it)."""
    for _ in range(trials):
        x = torch.randn(*shape, dtype=torch.float64) * 3
        with torch.no_grad():
            want, got = model(x.clone()), gm(x.clone())
        assert torch.equal(got, want), float((got - want).abs().max())


def torchvision_basic_block(inplanes, planes, stride=1):
    """torchvision.models.resnet.BasicBlock (graphopt.torchvision_style, written as torchvision writes it),
    with the downsample ResNet._make_layer gives it."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    return BasicBlock(inplanes, planes, stride, downsample)


class InPlaceZoo(nn.Module):
    """Every in-place spelling people use, in one forward."""

    def __init__(self):
        super().__init__()
        self.block = torchvision_basic_block(4, 8, 2)
        self.relu6 = nn.ReLU6(inplace=True)
        self.hswish = nn.Hardswish(inplace=True)
        self.hsig = nn.Hardsigmoid(inplace=True)
        self.silu = nn.SiLU(inplace=True)
        self.drop = nn.Dropout(0.2, inplace=True)
        self.lrelu = nn.LeakyReLU(0.1, inplace=True)
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.block(x)
        s = x.mean((2, 3), keepdim=True)
        x.mul_(self.hsig(s))  # squeeze-excite scale written in place
        x = self.hswish(self.relu6(x))
        x = self.silu(self.conv(x))
        x = F.relu6(F.relu(x, inplace=True), inplace=True)
        x.sub_(0.5).div_(2.0)
        x = F.hardtanh(x, -1.0, 1.5, inplace=True)
        x.clamp_(-0.9, 1.2).clamp_min_(-0.8)
        x = self.lrelu(x)
        x = torch.sigmoid_(x) + torch.tanh_(x.clone())
        return self.drop(x)


def test_torchvision_style_in_place_ops_become_functional_and_exact():
    model = recalibrate_bn(InPlaceZoo(), (torch.randn(2, 4, 8, 8),)).double()
    c = capture(model, (torch.randn(2, 4, 8, 8, dtype=torch.float64),))
    assert not _in_place(c.graph_module), _in_place(c.graph_module)
    record = _functionalize(c.passes)
    assert record.name == "functionalize" and record.modified and not record.declined
    by_op = record.stats["by_op"]
    for name in ("relu_ → relu", "add_ → add", "mul_ → mul", "hardtanh_ → hardtanh", "hardswish_ → hardswish",
                 "hardsigmoid_ → hardsigmoid", "silu_ → silu", "sigmoid_ → sigmoid", "tanh_ → tanh",
                 "clamp_ → clamp", "clamp_min_ → clamp_min", "leaky_relu_ → leaky_relu", "dropout_ → dropout",
                 "sub_ → sub", "div_ → div", "relu6_ → relu6"):
        assert name in by_op, (name, by_op)
    assert Property.FUNCTIONAL in c.properties
    _assert_same_function(model, c.graph_module, (2, 4, 8, 8))
    again = Functionalize().run(c.graph_module, PassContext((), None, {Property.ATEN}))
    assert not again.modified


def test_symbolic_trace_path_is_functional_too():
    model = recalibrate_bn(InPlaceZoo(), (torch.randn(2, 4, 8, 8),)).double()
    c = capture(model, (torch.randn(2, 4, 8, 8, dtype=torch.float64),), CaptureMethod.SYMBOLIC_TRACE)
    assert c.method is CaptureMethod.SYMBOLIC_TRACE and not _in_place(c.graph_module)
    _assert_same_function(model, c.graph_module, (2, 4, 8, 8))


def _graph(build) -> fx.GraphModule:
    """A hand-built ATen graph (export always reads the newest alias; other producers need not)."""
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(build(g, x))
    return fx.GraphModule(nn.Module(), g)


def test_later_readers_of_the_mutated_tensor_are_redirected():
    def build(g, x):
        a = g.call_function(aten.mul.Tensor, (x, 2.0))
        r = g.call_function(aten.relu_.default, (a,))  # a is now relu(2x)
        b = g.call_function(aten.add.Tensor, (a, 1.0))  # reads the mutated a
        c = g.call_function(aten.add_.Tensor, (b, r))  # b += r
        return g.call_function(aten.sub.Tensor, (b, a))  # (relu(2x)+1+relu(2x)) − relu(2x)

    gm = _graph(build)
    result = Functionalize().run(_graph(build), PassContext((), None, {Property.ATEN}))
    out = result.graph_module
    assert result.stats["rewritten"] == 2 and not _in_place(out)
    _assert_same_function(gm, out, (3, 5))


def test_a_mutation_read_through_an_earlier_alias_is_declined_and_kept():
    class ViewThenMutate(nn.Module):
        def forward(self, x):
            y = x * 1.5
            flat = y.view(-1)  # alias of y created before the mutation ...
            y.relu_()
            return flat + 1  # ... and read after it: flat sees relu(y)

    class BaseReadAfterViewMutation(nn.Module):
        def forward(self, x):
            y = x * 1.5
            y[:, :2].relu_()  # mutates part of y through a view
            return y * 2

    for model in (ViewThenMutate(), BaseReadAfterViewMutation()):
        c = capture(model, (torch.randn(3, 4, dtype=torch.float64),))
        declined = _functionalize(c.passes).declined
        assert len(declined) == 1 and "alias" in declined[0].reason, declined
        assert "test_functionalize.py" in declined[0].where
        assert _in_place(c.graph_module)
        _assert_same_function(model, c.graph_module, (3, 4))


def test_buffer_mutation_is_declined_and_dtype_of_in_place_result_kept():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))
            self.register_buffer("bias64", torch.randn(4, dtype=torch.float64))

        def forward(self, x):
            self.calls.add_(1)
            y = x * 2
            y.add_(self.bias64)  # float32 += float64 stays float32
            return y

    c = capture(Counter(), (torch.randn(3, 4),))
    declined = _functionalize(c.passes).declined
    assert len(declined) == 1 and "buffer 'calls'" in declined[0].reason
    out = c.graph_module(torch.ones(3, 4))
    assert out.dtype == torch.float32
    assert any(n.target is aten.to.dtype for n in c.graph_module.graph.nodes)


def test_functional_form_table():
    assert functional_form(aten.relu_.default) is aten.relu.default
    assert functional_form(aten.add_.Tensor) is aten.add.Tensor
    assert functional_form(aten.dropout_.default) is aten.dropout.default
    assert functional_form(aten.relu.default) is None  # already functional
    assert functional_form(aten.pow_.Scalar) is None  # pow.Scalar takes a Scalar base: not the same op
    assert functional_form(aten._native_batch_norm_legit.default) is None


def test_quantized_graph_has_no_dropout_and_no_in_place_op():
    model = recalibrate_bn(nn.Sequential(torchvision_basic_block(3, 8), nn.Dropout(0.3, inplace=True),
                                         nn.Hardswish(inplace=True)), (torch.randn(2, 3, 8, 8),))
    x = torch.randn(2, 3, 8, 8)
    qm = graphopt.quantize(model, (x,), calibration=[(x,)])
    targets = {str(n.target) for n in qm.graph.nodes if n.op == "call_function"}
    assert not {t for t in targets if "dropout" in t}, targets
    assert not _in_place(qm)
    with torch.no_grad():  # the QDQ graph still computes the model, within quantization error
        err = float((qm(x) - model(x)).abs().max() / model(x).abs().max())
    assert err < 0.05


def test_compile_reports_functionalize_and_matches():
    model = recalibrate_bn(nn.Sequential(torchvision_basic_block(3, 8, 2), nn.ReLU6(inplace=True)),
                           (torch.randn(1, 3, 8, 8),))
    x = torch.randn(1, 3, 8, 8)
    cm = graphopt.compile(model, (x,), "host", verify=True, progress=False)
    record = _functionalize(cm.report.passes)
    assert record.modified and record.stats["rewritten"] == 4
    with torch.no_grad():
        assert float((cm(x) - model(x)).abs().max() / model(x).abs().max()) < 1e-4
