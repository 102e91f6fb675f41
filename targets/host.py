"""The x86-64 host target: LLVM with the detected CPU (never the generic, AVX-less default).

Detection uses TVM's own probe (`Target.from_device`); feature flags come from /proc/cpuinfo, the
L1 data cache size from sysfs (unknown if absent).
"""
from __future__ import annotations

import os

from graphopt.targets.spec import Feature, Runtime, TargetSpec

_FLAG_FEATURES = {
    "avx2": Feature.AVX2,
    "fma": Feature.FMA,
    "avx512f": Feature.AVX512,
    "avx512_vnni": Feature.AVX512_VNNI,
    "avx512_vpopcntdq": Feature.AVX512_VPOPCNTDQ,
    "sse4_1": Feature.FP_ROUND,
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_bytes(level: int, kinds: tuple[str, ...]) -> int | None:
    """Core 0's cache of `level` and one of `kinds` in bytes (sysfs ``cpu0/cache/index*``), or None."""
    import glob

    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{index}/level") as f, open(f"{index}/type") as t, open(f"{index}/size") as z:
                found, kind, size = f.read().strip(), t.read().strip(), z.read().strip()
        except OSError:
            continue
        if found == str(level) and kind in kinds and size[:-1].isdigit() and size[-1] in "KM":
            return int(size[:-1]) << (10 if size[-1] == "K" else 20)
    return None


def detect_host() -> TargetSpec:
    import tvm

    mcpu = str(tvm.target.Target.from_device(tvm.cpu()).attrs.get("mcpu", "x86-64"))
    flags = _cpu_flags()
    features = {feat for flag, feat in _FLAG_FEATURES.items() if flag in flags}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    vector_bits = 512 if Feature.AVX512 in features else 256 if Feature.AVX2 in features else 128
    return TargetSpec(
        name="host",
        description=f"this x86-64 machine ({mcpu}, {cores} cores), run natively",
        tvm_target={"kind": "llvm", "mcpu": mcpu, "num-cores": cores},
        runtime=Runtime.TVM_VM_NATIVE,
        features=features,
        vector_bits=vector_bits,
        num_cores=cores,
        channel_multiple=vector_bits // 32,
        aliases=("x86",),
        l1d_bytes=_cache_bytes(1, ("Data",)),
        l2_bytes=_cache_bytes(2, ("Unified", "Data")),
        winograd=True,
    )

