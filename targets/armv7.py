"""armv7 (32-bit, hard-float Linux) target: a runtime-free C library, like the Cortex-M targets.

No armv7 TVM runtime exists (no wheels), so armv7 uses the same C library path as Cortex-M,
built with ``arm-linux-gnueabihf-gcc`` and run under ``qemu-arm -cpu cortex-a7``. Linux has no
board limits, so nothing is refused for size.
"""
from graphopt.targets.spec import Feature, Runtime, TargetSpec

SPEC = TargetSpec(
    name="armv7", description="Cortex-A7 armv7 Linux, NEON + VFPv4, hard-float (runtime-free C library)",
    tvm_target={"kind": "llvm", "mtriple": "armv7a-linux-gnueabihf", "mcpu": "cortex-a7",
                "mattr": ["+neon", "+vfp4"], "mfloat-abi": "hard"},
    runtime=Runtime.C_LIBRARY_QEMU_USER, features={Feature.NEON}, vector_bits=128, num_cores=1,
    channel_multiple=4, cross_compiler="arm-linux-gnueabihf-gcc", sysroot="/usr/arm-linux-gnueabihf",
    qemu_binary="qemu-arm", qemu_cpu="cortex-a7",
    cflags=("-mcpu=cortex-a7", "-mfpu=neon-vfpv4", "-mfloat-abi=hard"), aliases=("arm-a7",),
)
