"""ARM Cortex-M (bare-metal) targets: artifacts are runtime-free C libraries (`targets/c_library.py`).

Each target names its QEMU board, whose memory bounds what a model may use: the code region
(`flash_bytes`, code + constants) and the data region (`ram_bytes`, arenas + stack). The mps2
boards have 4 MiB SSRAM for each; `cortex-m55` runs on QEMU's MPS3 AN547 board (Cortex-M55 with
MVE), where code + constants live in the 512 KiB ITCM (the boot vector table is there) and data
in the 512 KiB DTCM.

All three run `MCU_OPS`, a CMSIS-NN / TFLite-Micro-like operator set: float32 and graphopt's int8
integer ops; convolutions with any kernel, depthwise but not grouped (split into convolutions)
and not dilated (zero-inserted dense kernel); ReLU and clamp as the only float activations —
hardtanh/ReLU6/hardswish/hardsigmoid become clamps exactly, while GELU, SiLU, sigmoid and tanh
need ``approximate=True`` (in int8 they are exact lookup tables, `graphopt.qlut`); no fused layer
norm or attention (decomposed exactly into mean/rsqrt and matmul/softmax); no float64; compute
on tensors of rank ≤ 4. Integer convolutions (`qconv2d`) are admitted with any groups and
dilation, since graphopt has no integer split/densify rewrite to offer instead.
"""
from graphopt.targets.opset import OperatorSet, OpRule
from graphopt.targets.registry import register_target
from graphopt.targets.spec import Feature, Runtime, TargetSpec

_INDEX = "index/mask arithmetic (positions, attention masks)"
MCU_OPS = OperatorSet(
    "mcu",
    rules=(
        OpRule("conv2d", depthwise=True, grouped=False, dilation=False),
        OpRule("linear"), OpRule("matmul"), OpRule("mm"), OpRule("bmm"),
        *(OpRule(k) for k in ("add", "sub", "mul", "div", "rsqrt", "mean", "softmax", "relu", "clamp",
                              "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "embedding")),
        *(OpRule(k, note=_INDEX) for k in ("arange", "gather", "ge", "gt", "le", "lt", "eq", "ne", "where",
                                           "logical_not", "any")),
        # graphopt's integer graph (graphopt.qops) and its float boundaries
        OpRule("qconv2d", dtypes={"int8", "int32"}, note="any groups/dilation: the conv rewrites are float-only"),
        *(OpRule(k, dtypes={"int8", "int32"}) for k in ("qlinear", "qmatmul", "qmul", "qsum_pool2d", "qadd",
                                                           "qsign")),
        OpRule("unpack_bits", dtypes={"uint8", "int8"}, note="4/2/1-bit weights stored packed"),
        OpRule("qlut", dtypes={"int8"}, note="int8 lookup table: any unary activation, exact vs. its QDQ form"),
        *(OpRule(k, dtypes={"int8", "int32", "float32"}) for k in (
            "requantize", "quantize_per_tensor", "dequantize_per_tensor", "dequantize_per_channel",
            "quantize_sign")),
    ),
    dtypes={"float32", "int8", "int32", "int64", "bool"}, max_rank=4,
    note="CMSIS-NN / TFLite-Micro-like: no erf/tanh/sigmoid in float, no grouped or dilated conv, no float64",
)

_COMMON = dict(runtime=Runtime.C_LIBRARY_QEMU_SYSTEM, num_cores=1, channel_multiple=1, ops=MCU_OPS,
               cross_compiler="arm-none-eabi-gcc", qemu_binary="qemu-system-arm")


def _thumb(triple: str, mcpu: str) -> dict:
    return {"kind": "llvm", "mtriple": triple, "mcpu": mcpu, "mfloat-abi": "hard"}


for _spec in (
    TargetSpec(name="cortex-m4", description="Cortex-M4F bare metal, FPv4-SP + DSP (QEMU mps2-an386)",
               tvm_target=_thumb("thumbv7em-none-eabihf", "cortex-m4"), vector_bits=0,
               features={Feature.DSP, Feature.FPU_SP}, qemu_cpu="cortex-m4", qemu_machine="mps2-an386",
               cflags=("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
               flash_bytes=4 << 20, ram_bytes=4 << 20, aliases=("m4",), **_COMMON),
    TargetSpec(name="cortex-m7", description="Cortex-M7 bare metal, FPv5 (single + double) + DSP (QEMU mps2-an500)",
               tvm_target=_thumb("thumbv7em-none-eabihf", "cortex-m7"), vector_bits=0,
               features={Feature.DSP, Feature.FPU_SP, Feature.FPU_DP, Feature.FP_ROUND}, qemu_cpu="cortex-m7",
               qemu_machine="mps2-an500",
               cflags=("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16"),
               flash_bytes=4 << 20, ram_bytes=4 << 20, aliases=("m7",), **_COMMON),
    TargetSpec(name="cortex-m55", description="Cortex-M55 bare metal, Helium (MVE) + FPU (QEMU mps3-an547)",
               tvm_target=_thumb("thumbv8.1m.main-none-eabihf", "cortex-m55"), vector_bits=128,
               features={Feature.MVE, Feature.DSP, Feature.FPU_SP, Feature.FPU_DP, Feature.FP_ROUND},
               qemu_cpu="cortex-m55",
               qemu_machine="mps3-an547", cflags=("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"),
               flash_bytes=512 << 10, ram_bytes=512 << 10, aliases=("m55",), **_COMMON),
):
    register_target(_spec)
