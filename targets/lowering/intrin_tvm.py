"""TVM's own CPU tensor intrinsics, imported one ISA module at a time and only when needed.

Importing ``tvm.s_tir.tensor_intrin`` imports every ISA's intrinsic module, each parsing all its
intrinsics with TVMScript: CUDA, ROCm, Hexagon and Metal ~1 min CPU (graphopt never uses them: they
stay stubbed), Arm ~1.7 s, x86 ~0.2 s (apache-tvm 0.27, load 2). `load(isa)` imports the package with
the other CPU modules held off, then ``tvm.s_tir.tensor_intrin.<isa>`` alone, so a compile registers
only the intrinsics of the kernels its layers use (an fp32 model none).

`register(kernel)` is the `DotKernel.registrar` of TVM's x86 VNNI, aarch64 ``sdot`` and NEON 4×4
kernels: it loads the ISA module defining the intrinsic; the VNNI one it re-registers with the operand
types LLVM 22 wants (its ``vpdpbusd`` takes ``(<16 x i32>, <64 x i8>, <64 x i8>)``; TVM 0.27 passes
i32 vectors and every VNNI kernel fails the verifier). `load_for(spec)` loads the modules whose
intrinsics MetaSchedule's rules for `spec` name (x86 VNNI/AVX-512, Arm NEON/dotprod): tuning and
applying a tuning database need them registered before the first task or record is read.
"""
from __future__ import annotations

import importlib
import sys
import threading
import types

from graphopt.targets.lowering.dot import DotKernel
from graphopt.targets.spec import Feature, TargetSpec

PACKAGE = "tvm.s_tir.tensor_intrin"
_GPU = ("cuda", "rocm", "hexagon", "metal")  # stubbed for good
_CPU = ("x86", "arm_cpu", "riscv_cpu")  # held off while the package imports, then importable one by one
_ISA_OF_INTRIN = {"dot_16x4_vnni": "x86", "dot_4x4_i8i8s32_sdot": "arm_cpu", "dot_4x4_i8i8s32_neon": "arm_cpu"}
# MetaSchedule's LLVM rule sets: x86 with AVX-512 ("avx512", "vnni") and Arm ("neon", "dotprod") tensorize
_ISA_OF_FEATURE = ((Feature.AVX512, "x86"), (Feature.NEON, "arm_cpu"), (Feature.A64, "arm_cpu"))
_VNNI_FIXED = False
_LOADING = threading.Lock()  # the stubs are swapped in and out of sys.modules: one thread at a time


def _import_package() -> None:
    """Import the package without its GPU modules (for good) or its CPU ones (until `load` asks)."""
    if PACKAGE in sys.modules:
        return
    for name in _GPU:
        sys.modules.setdefault(f"{PACKAGE}.{name}", types.ModuleType(f"{PACKAGE}.{name}"))
    held = {name: types.ModuleType(f"{PACKAGE}.{name}") for name in _CPU if f"{PACKAGE}.{name}" not in sys.modules}
    sys.modules.update({f"{PACKAGE}.{name}": stub for name, stub in held.items()})
    try:
        package = importlib.import_module(PACKAGE)
    finally:
        for name, stub in held.items():
            if sys.modules.get(f"{PACKAGE}.{name}") is stub:
                del sys.modules[f"{PACKAGE}.{name}"]
    for name, stub in held.items():  # `from . import x86` bound the stubs in the package
        if getattr(package, name, None) is stub:
            delattr(package, name)


def load(isa: str) -> types.ModuleType:
    """Import TVM's intrinsic module of one ISA (``"x86"``, ``"arm_cpu"``), registering its intrinsics."""
    with _LOADING:
        _import_package()
        module = importlib.import_module(f"{PACKAGE}.{isa}")
        if isa == "x86":
            _fix_vnni(module)
    return module


def load_for(spec: TargetSpec) -> None:
    """Register the intrinsics MetaSchedule's rules for `spec` name (none for a target without them)."""
    with _LOADING:
        _import_package()  # MetaSchedule's TuneContext imports the package: never with its GPU modules
    for isa in dict.fromkeys(isa for feature, isa in _ISA_OF_FEATURE if spec.has(feature)):
        load(isa)


def load_defining(name: str) -> bool:
    """Load TVM's CPU intrinsic modules until one has registered the intrinsic `name`; whether one did."""
    from tvm.s_tir import TensorIntrin

    for isa in (None, *_CPU):
        if isa is not None:
            load(isa)
        if TensorIntrin.get(name, allow_missing=True) is not None:
            return True
    return False


def register(kernel: DotKernel) -> None:
    """The `DotKernel.registrar` of TVM's own kernels: loads the ISA module defining ``kernel.intrin``."""
    load(_ISA_OF_INTRIN[kernel.intrin])


def _fix_vnni(x86: types.ModuleType) -> None:
    global _VNNI_FIXED
    if _VNNI_FIXED:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def vnni_impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),  # type: ignore[valid-type]  # TVMScript
        B: T.Buffer((16, 4), "int8", offset_factor=1),  # type: ignore[valid-type]  # TVMScript
        C: T.Buffer((16,), "int32", offset_factor=1),  # type: ignore[valid-type]  # TVMScript
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # operands as expressions: TVMScript turns a named one into a 1-element local buffer, which the
            # parallel lambdas allocated through TVMBackendAllocWorkspace and round-tripped through memory
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    TensorIntrin.register("dot_16x4_vnni", x86.dot_product_16x4_u8i8i32_desc, vnni_impl, override=True)
    _VNNI_FIXED = True
