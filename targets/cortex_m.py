"""ARM Cortex-M (bare-metal) targets: artifacts are runtime-free C libraries (`targets/c_library.py`).

Each target names its QEMU board, whose memory bounds what a model may use: the code region
(`flash_bytes`, code + constants) and the data region (`ram_bytes`, arenas + stack). The mps2
boards have 4 MiB SSRAM for each; `cortex-m55` runs on QEMU's MPS3 AN547 board (Cortex-M55 with
MVE), where code + constants live in the 512 KiB ITCM (the boot vector table is there) and data
in the 512 KiB DTCM.
"""
from graphopt.targets.registry import register_target
from graphopt.targets.spec import Feature, Runtime, TargetSpec

_COMMON = dict(runtime=Runtime.C_LIBRARY_QEMU_SYSTEM, num_cores=1, channel_multiple=1,
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
               features={Feature.DSP, Feature.FPU_SP, Feature.FPU_DP}, qemu_cpu="cortex-m7",
               qemu_machine="mps2-an500",
               cflags=("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16"),
               flash_bytes=4 << 20, ram_bytes=4 << 20, aliases=("m7",), **_COMMON),
    TargetSpec(name="cortex-m55", description="Cortex-M55 bare metal, Helium (MVE) + FPU (QEMU mps3-an547)",
               tvm_target=_thumb("thumbv8.1m.main-none-eabihf", "cortex-m55"), vector_bits=128,
               features={Feature.MVE, Feature.DSP, Feature.FPU_SP, Feature.FPU_DP}, qemu_cpu="cortex-m55",
               qemu_machine="mps3-an547", cflags=("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"),
               flash_bytes=512 << 10, ram_bytes=512 << 10, aliases=("m55",), **_COMMON),
):
    register_target(_spec)
