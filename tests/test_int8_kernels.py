"""Tensorized int8 kernels (graphopt.targets.lowering.int8 + schedules.TensorizedDot): weight packing against a
float64 oracle, per-layer kernel choice, and bit-exact outputs against the folded integer graph on
every kernel — VNNI (host), sdot (arm-a55), NEON (arm-a53) — with requantize fused into the kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_tools
from torch import nn

import graphopt
from graphopt.quantization import to_integer
from graphopt.targets import get_target
from graphopt.targets.lowering.dot import DotKernel
from graphopt.targets.lowering.int8 import _pack_conv_weight, _pack_dense_weight, choose, reduction
from graphopt.targets.lowering.kernels import dot_kernels
from graphopt.targets.spec import Feature

X = torch.randn(1, 3, 14, 14, generator=torch.Generator().manual_seed(1))


class Net(nn.Module):
    """3-channel stem (channel padding), stride 2, 7×7 maps (a 7-pixel tile), 1×1, residual add,
    depthwise (generic path), dense with 10 outputs (not a multiple of any kernel's lanes)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.down = nn.Conv2d(32, 48, 3, stride=2, padding=1)
        self.pw = nn.Conv2d(48, 48, 1)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.fc = nn.Linear(48 * 7 * 7, 10)

    def forward(self, x):
        y = torch.relu(self.down(torch.relu(self.stem(x))))
        y = torch.relu(self.pw(y) + y)
        return self.fc(nn.functional.relu6(self.dw(y)).flatten(1))


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    net = Net().eval()
    calibration = [(torch.randn(4, 3, 14, 14, generator=torch.Generator().manual_seed(2)),)]
    q = graphopt.quantize(net, (X,), calibration)
    return q, to_integer(q, (X,))


def _inputs():
    g = torch.Generator().manual_seed(5)
    return [X, 3 * torch.randn(1, 3, 14, 14, generator=g), torch.full((1, 3, 14, 14), 1e3)]


def _check_exact(cm, integer_graph):
    for x in _inputs():
        assert torch.equal(cm(x), integer_graph(x))
    stats = cm.report.lowering
    assert stats["scheduled"].get("tensorized_dot", 0) >= 3  # stem, down, pw (+ the dense)


def test_packed_conv_weight_reproduces_the_convolution():
    """Σ over the packed layout [F/L, KH, KW, C/D, L, D] equals the HWIO convolution (float64)."""
    rng = np.random.default_rng(0)
    kernel = DotKernel(Feature.NEON, "any", lanes=4, depth=4, data_dtype="int8", accumulators=8)
    w = rng.integers(-128, 128, (3, 3, 6, 10)).astype(np.int8)  # HWIO, C and F not multiples
    x = rng.integers(-128, 128, (5, 5, 6)).astype(np.float64)
    packed = _pack_conv_weight(w, kernel).astype(np.float64)
    assert packed.shape == (3, 3, 3, 2, 4, 4)
    xp = np.pad(x, [(0, 0), (0, 0), (0, 2)])
    for y, xx, f in [(0, 0, 0), (2, 1, 9), (1, 2, 5)]:
        want = sum(x[y + i, xx + j, c] * w[i, j, c, f] for i in range(3) for j in range(3) for c in range(6))
        got = sum(xp[y + i, xx + j, c] * packed[f // 4, i, j, c // 4, f % 4, c % 4]
                  for i in range(3) for j in range(3) for c in range(8))
        assert got == want
    dense = rng.integers(-128, 128, (7, 5)).astype(np.int8)  # [K, N]
    pd = _pack_dense_weight(dense, kernel)
    assert pd.shape == (2, 2, 4, 4)
    assert np.array_equal(pd[1, 0, 0, :], dense[:4, 4]) and not pd[1, 0, 1:, :].any()


def test_kernel_choice_per_layer():
    wide = DotKernel(Feature.NEON, "wide", lanes=4, depth=16, data_dtype="int8", accumulators=8, min_weight=-127)
    narrow = DotKernel(Feature.NEON, "narrow", lanes=4, depth=4, data_dtype="int8", accumulators=8)
    w = np.zeros((3, 3, 32, 8), np.int8)
    assert choose((wide, narrow), w, 32) is wide  # no padding for either: the preferred one
    assert choose((wide, narrow), w, 12) is wide  # 16 values against 12: within PAD_TOLERANCE, the preferred one
    assert choose((wide, narrow), w, 5) is narrow  # 16 values against 8: less padding
    w[0, 0, 0, 0] = -128
    assert choose((wide, narrow), w, 32) is narrow  # −128 would overflow the wide kernel's int16 pairs
    assert choose((narrow,), w, 1) is None  # 1 → 4 channels: 4× the MACs, the generic kernel wins
    assert choose((narrow,), w, 3) is narrow
    # a conv row's window·channels values are contiguous: 1 channel × 3 taps reduce 4 values, not 12
    assert choose((narrow,), w, 1, window=3) is narrow and reduction(narrow, 1, 3) == (4, True)
    assert reduction(wide, 3, 7) == (32, True) and reduction(narrow, 3, 7) == (24, True)
    assert reduction(narrow, 32, 3) == (96, False) and reduction(narrow, 3, 3) == (12, False)  # no gain: by channel
    assert [k.feature for k in dot_kernels(get_target("arm-a55"))][0] is Feature.DOTPROD
    assert dot_kernels(get_target("arm-a53"))[0].feature is Feature.A64
    assert not dot_kernels(get_target("armv7"))  # 32-bit NEON: aarch64 intrinsics would not compile
    with pytest.raises(ValueError, match="weight_dtype"):
        DotKernel(Feature.NEON, "x", 4, 4, "int8", 8, weight_dtype="int4")


def test_host_kernels_are_bit_exact_and_requantize_is_fused(quantized):
    q, integer_graph = quantized
    cm = graphopt.compile(q, (X,), "host", progress=False)
    _check_exact(cm, integer_graph)


@pytest.mark.parametrize("target", ["host", "arm-a55", "cortex-m4"])
def test_zero_point_pads_are_read_inside_dot_kernels(quantized, target):
    """`down`'s zero-point pad (the stem's output, 14×14×32) is no kernel of its own: its conv reads the
    unpadded tensor and the zero point at the border (`int8.fuse_input_pads`) — except on a board with a
    RAM budget, where a separate pad keeps the arena smaller; exactness is checked on each kernel by
    the tests around."""
    from tvm import tirx

    from graphopt.targets.lowering.phases import lower
    from graphopt.targets.tuning.icount import _buffer_args

    q, integer_graph = quantized
    ir = lower(torch.export.export(integer_graph, (X,)).run_decompositions(), get_target(target)).ir_module
    inputs = {gv.name_hint: [tuple(shape) for _, shape in _buffer_args(f)]
              for gv, f in ir.functions_items() if isinstance(f, tirx.PrimFunc)}
    fused = get_target(target).ram_bytes is None
    # the 3×3 one (the stem's 1×1 over its copied windows reads 14×14×32 too: `patches`)
    down = [name for name, shapes in inputs.items()
            if "conv2d_int8" in name and shapes[0] == (1, 14, 14, 32) and shapes[1][1] == 3]
    assert len(down) == fused, inputs
    assert any((1, 16, 16, 32) in shapes for shapes in inputs.values()) != fused, inputs


@pytest.mark.parametrize("target", ["arm-a55", "arm-a53", "arm-a55-c"])
def test_aarch64_kernels_are_bit_exact(quantized, target):
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    q, integer_graph = quantized
    _check_exact(graphopt.compile(q, (X,), target, progress=False), integer_graph)


@pytest.mark.parametrize("target", ["arm-a55-c", "cortex-m4"])
def test_conv_free_models_take_the_dot_kernels_in_a_c_library(target):
    """An int8 MLP in a runtime-free C library: its linear layers are dot kernels as in the VM builds.
    The C library once skipped the whole layout phase for conv-free graphs, constant weight transposes
    included, so `legalize_matmul` saw no constant weight and took the generic kernel (cortex-m4:
    31,575 instructions instead of 15,400)."""
    require_tools(*(("arm-none-eabi-gcc", "qemu-system-arm") if target == "cortex-m4"
                    else ("aarch64-linux-gnu-gcc", "qemu-aarch64")))
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    x = torch.randn(1, 64)
    q = graphopt.quantize(mlp, (x,), [(torch.randn(8, 64),)])
    cm = graphopt.compile(q, (x,), target, progress=False, count_instructions=False)
    assert cm.report.lowering["scheduled"].get("tensorized_dot", 0) == 2
    integer_graph = to_integer(q, (x,))
    for inp in (x, 4 * torch.randn(1, 64, generator=torch.Generator().manual_seed(2))):
        assert torch.equal(cm(inp), integer_graph(inp))


def test_armv7_takes_the_generic_int8_kernels(quantized):
    """No dot kernel is written for 32-bit ARM: the generic kernels, still exact."""
    require_tools("arm-linux-gnueabihf-gcc", "qemu-arm")
    q, integer_graph = quantized
    cm = graphopt.compile(q, (X,), "armv7", progress=False)
    assert "tensorized_dot" not in cm.report.lowering["scheduled"]
    assert torch.equal(cm(X), integer_graph(X))


@pytest.mark.parametrize("optimize_for", ["balanced", "size"])
@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m55"])
def test_cortex_m_kernels_are_bit_exact(quantized, target, optimize_for):
    """On M55 this model once came out wrong in every output: its input quantize, rounded by
    truncation and selects, miscomputes there under QEMU; `nearbyint` (FPv5 VRINT) is exact.
    Both weight storages (int16 by default, int8 with optimize_for="size") run."""
    require_tools("arm-none-eabi-gcc", "qemu-system-arm")
    q, integer_graph = quantized
    cm = graphopt.compile(q, (X,), target, progress=False, optimize_for=optimize_for)
    assert torch.equal(cm(X), integer_graph(X))
    storages = {r["storage"] for r in cm.report.lowering["weight_storage"]["layers"]}
    assert storages == ({"int8"} if optimize_for == "size" else {"int16"})


class Stems(nn.Module):
    """A 1-channel 3×3 conv (the generic kernel; on NEON a 1×1 conv over its copied windows, `patches`), a
    3-channel 7×7 stride-2 stem (ResNet's) reducing over whole window rows (`int8.reduction`), then a regular
    conv."""

    def __init__(self):
        super().__init__()
        self.gray = nn.Conv2d(1, 3, 3, padding=1)
        self.rgb = nn.Conv2d(3, 16, 7, stride=2, padding=3)
        self.body = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.body(torch.relu(self.rgb(torch.relu(self.gray(x)))))


@pytest.mark.parametrize("target", ["host", "arm-a53", "arm-a55", "cortex-m4"])
def test_few_channel_stems_reduce_over_window_rows_exactly(target):
    if target != "host":
        require_tools(*(("arm-none-eabi-gcc", "qemu-system-arm") if target == "cortex-m4"
                        else ("aarch64-linux-gnu-gcc", "qemu-aarch64")))
    x = torch.randn(1, 1, 15, 15, generator=torch.Generator().manual_seed(3))
    calibration = [(torch.randn(4, 1, 15, 15, generator=torch.Generator().manual_seed(4)),)]
    q = graphopt.quantize(Stems().eval(), (x,), calibration)
    cm = graphopt.compile(q, (x,), target, progress=False)
    copied = int(target in ("arm-a53", "arm-a55"))
    assert cm.report.lowering["scheduled"].get("tensorized_dot", 0) == 2 + copied  # the 3-channel stem too
    assert cm.report.lowering["scheduled"].get("conv_patches", 0) == copied
    integer_graph = to_integer(q, (x,))
    for inp in (x, 3 * torch.randn(1, 1, 15, 15, generator=torch.Generator().manual_seed(6))):
        assert torch.equal(cm(inp), integer_graph(inp))
    if target == "host":  # the 7×7×3 stem reads [n, h, w·c] rows, not channel-padded pixels
        from graphopt.targets.lowering.phases import lower

        mod = lower(torch.export.export(integer_graph, (x,)).run_decompositions(), get_target(target)).ir_module
        assert sum('T.sblock("rows")' in f.script() for _, f in mod.functions_items()) == 1


def test_conv_kernels_write_int8_not_int32(quantized):
    """requantize fused into the conv epilogue: no int32 accumulator tensor between kernels."""
    from tvm import relax

    from graphopt.targets.lowering.phases import lower

    _, integer_graph = quantized
    result = lower(torch.export.export(integer_graph, (X,)).run_decompositions(), get_target("host"))
    main = result.ir_module["main"]
    dtypes = []
    for block in main.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if isinstance(call, relax.Call) and call.op.name == "relax.call_tir" \
                    and "conv2d_int8" in call.args[0].name_hint:
                dtypes.append(str(binding.var.ty.dtype))
    assert dtypes and set(dtypes) == {"int8"}, dtypes


def test_tensorized_kernels_are_tuned_over_their_tiles(quantized):
    """Every kernel is a tuning task: the tensorized dot kernels with their register tiles and loop
    orders as the design spaces (`schedules.dot_tiles`, the default first), the others (the depthwise
    int8 conv, data movement) with MetaSchedule's rules."""
    from graphopt.targets.lowering.dot import DOT_ATTR
    from graphopt.targets.lowering.schedules import dot_tiles
    from graphopt.targets.tuning.metaschedule import extract, fused_module

    _, integer_graph = quantized
    spec = get_target("host")
    mod = fused_module(torch.export.export(integer_graph, (X,)).run_decompositions(), spec)
    tensorized = {f.script() for _, f in mod.functions_items() if DOT_ATTR in f.script()}
    tasks = extract(mod, spec)
    dot_tasks = [t for t in tasks if DOT_ATTR in t.dispatched[0].script()]
    assert len(tensorized) >= 3 and len(dot_tasks) == len(tensorized)
    assert all(dot_tiles(t.dispatched[0]["main"], spec) for t in dot_tasks)
    assert not [t.task_name for t in tasks if t not in dot_tasks and dot_tiles(t.dispatched[0]["main"], spec)]
    assert any("conv2d" in t.task_name for t in tasks if t not in dot_tasks)  # the depthwise int8 conv


# ---- edge sizes: reductions of length 1 (issue 15) and other degenerate shapes


@pytest.fixture(scope="module")
def edge_quantized():
    from edge_models import EdgeSizes, edge_input

    torch.manual_seed(0)
    x = edge_input()
    q = graphopt.quantize(EdgeSizes().eval(), (x,), [(edge_input(2, batch=8),)])
    return q, to_integer(q, (x,)), x


@pytest.mark.parametrize("target", ["host", pytest.param("arm", marks=pytest.mark.emulation),
                                    pytest.param("cortex-m4", marks=pytest.mark.emulation),
                                    pytest.param("arm-a55", marks=pytest.mark.slow),
                                    pytest.param("armv7", marks=pytest.mark.slow)])
def test_edge_sizes_are_bit_exact(edge_quantized, target):
    """`EdgeSizes` int8 (grouped and depthwise 1×1 with one input channel per group, Linear(1, N), 1×1
    maps and pools, kernels larger than their input, strides larger than their kernel) on the target's
    dot kernel (VNNI, NEON, sdot, SMLAD) and generic kernels, equal to the integer graph and to
    `graphopt.qref`. The depthwise 1×1 (a reduction of length 1) used to fail to build on every target
    (TVM: 'IntImm supports only int or uint or bool type, but float32 was supplied')."""
    from edge_models import TOOLS, assert_bit_exact

    require_tools(*TOOLS.get(target, ()))
    q, integer_graph, x = edge_quantized
    options = {} if target == "host" else {"count_instructions": False}
    cm = graphopt.compile(q, (x,), target, progress=False, **options)
    if dot_kernels(get_target(target)):
        assert cm.report.lowering["scheduled"].get("tensorized_dot", 0) >= 5
    assert_bit_exact(cm, integer_graph)
