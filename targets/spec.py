"""Target specifications: frozen, validated descriptions of a device graphopt compiles for.

A `TargetSpec` is pure data. Lowering, scheduling and emulation read its fields and feature
flags; nothing in graphopt branches on a target's *name*. Refuses: unknown features, runtimes
without the fields they need (e.g. a QEMU runtime without a QEMU CPU).
"""
from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from graphopt.errors import ConfigError
from graphopt.targets.opset import EVERYTHING, OperatorSet


class Feature(str, enum.Enum):
    """ISA features that schedules and passes may key on."""

    # x86
    AVX2 = "avx2"
    FMA = "fma"
    AVX512 = "avx512"
    AVX512_VNNI = "avx512vnni"
    AVX512_VPOPCNTDQ = "avx512vpopcntdq"
    FP_ROUND = "fp-round"  # float round-to-integral instructions: SSE4.1 round, AArch64 frint, FPv5/ARMv8 VRINT
    # ARM A-profile
    A64 = "a64"  # the AArch64 instruction set (its NEON intrinsics differ from 32-bit ARM's)
    NEON = "neon"
    DOTPROD = "dotprod"
    I8MM = "i8mm"
    FP16 = "fp16"
    # ARM M-profile
    DSP = "dsp"
    FPU_SP = "fpu-sp"
    FPU_DP = "fpu-dp"
    MVE = "mve"


class Runtime(str, enum.Enum):
    """How a compiled artifact is executed."""

    TVM_VM_NATIVE = "tvm-vm-native"  # .so loaded in-process with tvm.runtime
    TVM_VM_QEMU_USER = "tvm-vm-qemu-user"  # cross-compiled .so + C++ runner under qemu-user
    C_LIBRARY_QEMU_USER = "c-library-qemu-user"  # runtime-free C library, Linux user mode
    C_LIBRARY_QEMU_SYSTEM = "c-library-qemu-system"  # runtime-free C library, bare metal


_C_LIBRARY_RUNTIMES = {Runtime.C_LIBRARY_QEMU_USER, Runtime.C_LIBRARY_QEMU_SYSTEM}
_QEMU_RUNTIMES = {Runtime.TVM_VM_QEMU_USER, *_C_LIBRARY_RUNTIMES}


@dataclass(frozen=True)
class TargetSpec:
    """One compilation target.

    name:            registry key, e.g. ``"arm-a55"``.
    description:     one line for ``graphopt targets``.
    tvm_target:      the JSON dict handed to ``tvm.target.Target``.
    runtime:         how artifacts run (see `Runtime`).
    features:        ISA feature flags; schedules choose rules from these.
    vector_bits:     SIMD register width the schedules vectorize for (0 = scalar).
    num_cores:       threads the default schedules parallelize over.
    cross_compiler:  C/C++ compiler driver for the artifact (None = host compiler).
    sysroot:         ``-L`` prefix for qemu-user (the cross libc).
    qemu_binary:     emulator executable, ``qemu_cpu`` / ``qemu_machine`` its CPU and board.
    channel_multiple: channel counts this target prefers (SIMD lanes), used by pruning.
    aliases:         other names that resolve to this spec.
    cflags:          C compiler flags selecting the target's CPU and float ABI, for runtime-free C
                     libraries (the generated code must be compiled with them to link with the kernels).
    flash_bytes / ram_bytes: the board's code+constant and data memory; a model that does not fit
                     is refused at compile time (None = no limit, e.g. a Linux target).
    l1d_bytes:       one core's L1 data cache; the int8 dot kernels' tile model charges weight tiles
                     larger than it as streamed from L2 (None = unknown: the model counts loads only).
    l2_bytes:        one core's L2 cache; Winograd asks more re-use of transformed weights larger than
                     it, which stream from L3 or memory (None = unknown: as if they fit).
    ops:             the `OperatorSet` the device runs (default: everything TVM lowers); compile
                     legalizes the graph into it or refuses the model (`graphopt.passes.legalization`).
    winograd:        fp32 3×3 stride-1 convs may be lowered as Winograd F(4, 3) or F(2, 3) where it was measured to
                     win (`graphopt.targets.lowering.winograd`); off unless a target's schedules were
                     measured with it.
    """

    name: str
    description: str
    tvm_target: dict
    runtime: Runtime
    features: Collection[Feature] = field(default_factory=frozenset)  # stored as a frozenset
    vector_bits: int = 128
    num_cores: int = 1
    cross_compiler: str | None = None
    sysroot: str | None = None
    qemu_binary: str | None = None
    qemu_cpu: str | None = None
    qemu_machine: str | None = None
    channel_multiple: int = 4
    aliases: Sequence[str] = ()  # stored as a tuple
    cflags: Sequence[str] = ()  # stored as a tuple
    flash_bytes: int | None = None
    ram_bytes: int | None = None
    l1d_bytes: int | None = None
    l2_bytes: int | None = None
    ops: OperatorSet = EVERYTHING
    winograd: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"target name {self.name!r} must be a non-empty identifier like 'arm-a55'")
        if not isinstance(self.runtime, Runtime):
            raise ConfigError(f"target {self.name}: runtime must be a graphopt.targets.Runtime, got {self.runtime!r}")
        bad = [f for f in self.features if not isinstance(f, Feature)]
        if bad:
            raise ConfigError(f"target {self.name}: unknown features {bad}; use graphopt.targets.Feature members")
        object.__setattr__(self, "features", frozenset(self.features))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        object.__setattr__(self, "cflags", tuple(self.cflags))
        if any(v is not None and (not isinstance(v, int) or v <= 0)
               for v in (self.flash_bytes, self.ram_bytes, self.l1d_bytes, self.l2_bytes)):
            raise ConfigError(f"target {self.name}: flash_bytes, ram_bytes, l1d_bytes and l2_bytes must be positive "
                              "ints or None")
        if not isinstance(self.ops, OperatorSet):
            raise ConfigError(f"target {self.name}: ops must be a graphopt.OperatorSet, got {type(self.ops).__name__}")
        if "kind" not in self.tvm_target:
            raise ConfigError(f"target {self.name}: tvm_target needs a 'kind' key, e.g. {{'kind': 'llvm'}}")
        if self.runtime in _QEMU_RUNTIMES and not (self.qemu_binary and (self.qemu_cpu or self.qemu_machine)):
            raise ConfigError(
                f"target {self.name}: runtime {self.runtime.value} needs qemu_binary and qemu_cpu/qemu_machine; "
                "an emulated run without a pinned CPU would execute instructions the device lacks"
            )
        if self.vector_bits < 0 or self.num_cores < 1 or self.channel_multiple < 1:
            raise ConfigError(f"target {self.name}: vector_bits >= 0, num_cores >= 1, channel_multiple >= 1 required")

    def has(self, feature: Feature) -> bool:
        return feature in self.features

    @property
    def is_emulated(self) -> bool:
        return self.runtime in _QEMU_RUNTIMES

    @property
    def is_c_library(self) -> bool:
        """Artifacts are runtime-free C libraries (no TVM runtime on the device)."""
        return self.runtime in _C_LIBRARY_RUNTIMES

    def tvm(self):
        """The `tvm.target.Target` for this spec (imports TVM lazily)."""
        import tvm

        return tvm.target.Target(dict(self.tvm_target))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "tvm_target": dict(self.tvm_target),
            "runtime": self.runtime.value,
            "features": sorted(f.value for f in self.features),
            "vector_bits": self.vector_bits,
            "num_cores": self.num_cores,
            "cross_compiler": self.cross_compiler,
            "qemu": {"binary": self.qemu_binary, "cpu": self.qemu_cpu, "machine": self.qemu_machine},
            "channel_multiple": self.channel_multiple,
            "aliases": list(self.aliases),
            "cflags": list(self.cflags),
            "memory": {"flash_bytes": self.flash_bytes, "ram_bytes": self.ram_bytes, "l1d_bytes": self.l1d_bytes,
                       "l2_bytes": self.l2_bytes},
            "ops": self.ops.to_dict(),
            "winograd": self.winograd,
        }
