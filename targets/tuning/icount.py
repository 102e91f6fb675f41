"""ARM performance PROXY: guest instructions per kernel call under ``qemu-<arch> -cpu <target cpu>``.

Instructions are not cycles (no caches, no pipeline): a deterministic relative measure for ranking
schedules where no board is at hand, never a speed. Everything here says "proxy" in its output.

- `count_kernel(so, func, tensors, spec)`: instructions per call of ``func`` in a cross-compiled
  kernel library, on synthetic inputs: (count with 1+k calls − count with 1 call) / k, counted by
  graphopt's QEMU TCG plugin, run by ``runtime/kernel_runner.cc`` (single-threaded).
- `kernel_counts(ir_module, spec)`: per fused kernel of a scheduled module (lowering's
  ``LoweringResult.ir_module``), instructions per call × calls in ``main``.
- `IcountRunner`: a MetaSchedule runner scoring candidates by that count (reported to
  MetaSchedule as ``instructions × 1e-9`` "seconds", so fewer instructions rank better).

Refuses (`ConfigError`/`ToolchainError`): targets without a cross compiler, sysroot or QEMU CPU,
a missing plugin or tool.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from graphopt.errors import ConfigError, ToolchainError
from graphopt.targets.backends import toolchain
from graphopt.targets.backends.emulation import RUNTIME_SRC, qemu_user, read_count, run_runner
from graphopt.targets.spec import TargetSpec

_REPEAT = 2


def build_kernel_runner(spec: TargetSpec) -> Path:
    """The cross-compiled kernel runner for `spec` (cached by source, compiler and TVM versions)."""
    q = qemu_user(spec)
    arch = q.arch
    cxx = toolchain.require_tool(q.cross_compiler)
    rt = toolchain.ensure_runtime(arch)
    src = RUNTIME_SRC / "kernel_runner.cc"
    key = hashlib.sha256(b"\0".join([src.read_bytes(), cxx.encode(),
                                     json.dumps(toolchain.tvm_versions()).encode()])).hexdigest()[:16]
    out = toolchain.graphopt_home() / "kernel-runner" / f"{arch}-{key}" / "kernel_runner"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".kernel_runner.{os.getpid()}")
        toolchain.run_tool([cxx, "-std=c++17", "-O2", f"-I{rt / 'include'}", str(src), "-o", str(tmp),
                            f"-L{rt / 'lib'}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi"],
                           f"compiling the kernel runner with {q.cross_compiler}")
        os.replace(tmp, out)
    return out


def count_kernel(so: str | os.PathLike, func: str, tensors: list[tuple[str, list[int]]], spec: TargetSpec,
                 *, timeout: float = 300) -> int:
    """Guest instructions per call of `func` (a PROXY); `tensors`: (dtype, shape) per argument."""
    q = qemu_user(spec)
    arch = q.arch
    qemu = toolchain.require_tool(q.qemu_binary)
    plugin = toolchain.ensure_qemu_plugin()
    runner = build_kernel_runner(spec)
    env_lib = toolchain.runtime_dir(arch) / "lib"
    specs = [f"{dtype}:{','.join(str(int(d)) for d in shape)}" for dtype, shape in tensors]
    counts = []
    with tempfile.TemporaryDirectory(prefix="graphopt-icount-") as tmp:
        for name, repeat in (("base", 0), ("run", _REPEAT)):
            cmd = [qemu, "-cpu", q.qemu_cpu, "-L", q.sysroot, "-E", f"LD_LIBRARY_PATH={env_lib}",
                   "-plugin", f"{toolchain.qemu_option(plugin)},out={toolchain.qemu_option(Path(tmp) / name)}",
                   str(runner), str(so), func, str(repeat), *specs]
            run_runner(cmd, Path(tmp), timeout, f"instruction count (proxy) of {func}")
            counts.append(read_count(Path(tmp) / name))
    return max(0, round((counts[1] - counts[0]) / _REPEAT))


def _buffer_args(func) -> list[tuple[str, list[int]]]:
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    try:  # symbolic shapes do not convert: counted kernels need static shapes
        return [(str(a.dtype), [int(d) for d in a.shape]) for a in ArgInfo.from_prim_func(func)]
    except Exception as exc:  # noqa: BLE001  TVM: a non-tensor or dynamic parameter
        raise ConfigError(f"kernel with non-tensor or dynamic parameters cannot be counted: {exc}") from exc


def kernel_counts(ir_module, spec: TargetSpec) -> dict[str, dict]:
    """``{kernel: {"calls", "instructions_per_call", "instructions"}}`` for a scheduled module (PROXY)."""
    import tvm
    from tvm import relax
    from tvm.support import cc

    calls: dict[str, int] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            calls[expr.args[0].name_hint] = calls.get(expr.args[0].name_hint, 0) + 1

    for _, f in ir_module.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    q = qemu_user(spec)
    result = {}
    with tempfile.TemporaryDirectory(prefix="graphopt-kernels-") as tmp:
        for gv, f in ir_module.functions_items():
            if not isinstance(f, tvm.tirx.PrimFunc) or gv.name_hint not in calls:
                continue
            lib = tvm.build(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=spec.tvm())
            so = Path(tmp) / f"{hashlib.sha1(gv.name_hint.encode()).hexdigest()[:16]}.so"  # fused names: > 255 bytes
            lib.export_library(str(so), fcompile=cc.cross_compiler(q.cross_compiler))
            per = count_kernel(so, "main", _buffer_args(f), spec)
            result[gv.name_hint] = {"calls": calls[gv.name_hint], "instructions_per_call": per,
                                    "instructions": per * calls[gv.name_hint]}
    return result


def _make_runner_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class IcountRunner(ms.runner.PyRunner):
        """MetaSchedule runner: instructions per call under qemu (PROXY), as ``count × 1e-9`` seconds."""

        def __init__(self, spec: TargetSpec, workers: int = 2):
            self.spec = spec
            self.pool = ThreadPoolExecutor(max_workers=workers)

        def _one(self, runner_input):
            try:
                tensors = [(str(a.dtype), [int(d) for d in a.shape]) for a in runner_input.args_info]
                n = count_kernel(runner_input.artifact_path, "main", tensors, self.spec)
                return ms.runner.RunnerResult(run_secs=[n * 1e-9], error_msg=None)
            except (ToolchainError, ConfigError) as exc:
                return ms.runner.RunnerResult(run_secs=None, error_msg=str(exc)[:2000])
            # MetaSchedule's RemoveBuildArtifact callback deletes the artifact afterwards

        def run(self, runner_inputs):
            futures = [self.pool.submit(self._one, r) for r in runner_inputs]
            return [ms.runner.RunnerFuture(f_done=f.done, f_result=f.result) for f in futures]

    return IcountRunner


class IcountRunner:
    """Factory: ``IcountRunner.create(spec)`` builds the MetaSchedule runner (imports TVM lazily)."""

    _cls = None

    @classmethod
    def create(cls, spec: TargetSpec):
        qemu_user(spec)
        build_kernel_runner(spec)  # fail now, not inside a tuning session
        toolchain.ensure_qemu_plugin()
        if cls._cls is None:
            cls._cls = _make_runner_class()
        return cls._cls(spec)
