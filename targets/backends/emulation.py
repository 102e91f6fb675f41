"""Running aarch64 TVM VM artifacts under qemu-user, and packaging them for deployment.

- `build_runner(spec, out_dir)`: cross-compiles ``runtime/runner.cc`` against the harvested
  tvm-ffi headers (cached in ``graphopt_home()/runner`` by source hash, compiler and runtime).
- `package_arm_artifact(...)`: lays out a self-contained folder — ``model.so``, ``runner``,
  ``lib/libtvm_runtime.so``, ``lib/libtvm_ffi.so``, ``graphopt_model.h``, ``manifest.json`` —
  that runs on a device as ``./runner model.so --manifest manifest.json in0.bin ...``.
- `write_header(...)`: the C header documenting a deployed model's inputs and outputs.
- `run_emulated(...)`: runs an artifact folder under ``qemu-<arch> -cpu <spec.qemu_cpu>``,
  returns its outputs and, on request, instructions per inference counted with graphopt's TCG
  plugin: (count with k inferences - count with 0) / k, both runs after one warm-up inference
  (first-call allocation and lookups excluded: a steady-state figure).

Refuses: targets whose runtime is not `Runtime.TVM_VM_QEMU_USER`, inputs that do not match the
artifact's manifest, dtypes outside `SUPPORTED_DTYPES`, instruction counting with more than one
thread (the counter is not atomic and worker threads spin). A run that exceeds its timeout is
killed with its whole process group.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  registers numpy's "bfloat16" (outputs of that dtype)
import numpy as np

from graphopt.artifact import write_manifest
from graphopt.errors import ArtifactError, ConfigError, InputError, ToolchainError
from graphopt.targets.backends import toolchain
from graphopt.targets.spec import Runtime, TargetSpec

_log = logging.getLogger(__name__)

RUNTIME_SRC = Path(__file__).resolve().parent / "runtime"
SUPPORTED_DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "uint16",
                    "int32", "uint32", "int64", "uint64", "bool")
DEPLOYED_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
MANIFEST_FORMAT = "graphopt-tvm-vm-artifact"

# runner exit codes (see runner.cc)
_RUNNER_EXITS = {2: "usage error", 3: "input/output file error", 4: "model load error",
                 5: "inference error", 6: "unsupported output"}


@dataclass
class EmulatedRun:
    """Result of `run_emulated`.

    outputs: the model's outputs, nested tuples flattened depth-first.
    instructions_per_inference: guest instructions per inference, or None if not counted.
    wall_seconds: host wall time of the emulated run (with the plugin attached when counting).
    emulated_ms_per_inference: the runner's own clock, per inference, under emulation.
    instructions_unavailable: why counting was asked for but gave None.
    """

    outputs: list[np.ndarray]
    instructions_per_inference: int | None
    wall_seconds: float
    emulated_ms_per_inference: float | None = None
    instructions_unavailable: str | None = None


# --------------------------------------------------------------------------- specs and checks

@dataclass(frozen=True)
class QemuUser:
    """What building and emulating a TVM VM artifact for a target takes, every field set."""

    arch: str  # e.g. "aarch64"
    cross_compiler: str
    sysroot: str
    qemu_binary: str
    qemu_cpu: str


def qemu_user(spec: TargetSpec) -> QemuUser:
    """The target's qemu-user setup, if it runs TVM VM artifacts under qemu-user (else `ConfigError`)."""
    if spec.runtime is not Runtime.TVM_VM_QEMU_USER:
        raise ConfigError(f"target {spec.name} runs as {spec.runtime.value}, not as a TVM VM library under "
                          "qemu-user; the C++ runner does not apply to it")
    fields = {f: getattr(spec, f) for f in ("cross_compiler", "sysroot", "qemu_binary", "qemu_cpu")}
    missing = [f for f, v in fields.items() if not v]
    if missing:
        raise ConfigError(f"target {spec.name} lacks {', '.join(missing)} needed to build and emulate its runner")
    return QemuUser(str(spec.tvm_target.get("mtriple", "")).split("-")[0] or "?", **fields)


def _tensor_entries(specs: Sequence[Any], kind: str) -> list[dict]:
    """Normalize tensor specs (mappings or objects with name/shape/dtype) to JSON-able dicts.

    Dimensions stay ints; anything else (a symbolic name) becomes a string.
    """
    def field(s: Any, key: str) -> Any:
        return s.get(key) if isinstance(s, dict) else getattr(s, key, None)

    out = []
    for i, s in enumerate(specs):
        shape, dtype = field(s, "shape"), field(s, "dtype")
        if shape is None or dtype is None:
            raise ConfigError(f"{kind} #{i}: a tensor spec needs a shape and a dtype, got {s!r}")
        dims = [int(d) if isinstance(d, (int, np.integer)) else str(d) for d in shape]
        out.append({"name": str(field(s, "name") or f"{kind}{i}"), "shape": dims,
                    "dtype": str(dtype).removeprefix("torch.")})
    return out


def _itemsize(dtype: str) -> int | None:
    if dtype == "bool":
        return 1
    m = re.search(r"(\d+)$", dtype)
    return int(m.group(1)) // 8 if m else None


# --------------------------------------------------------------------------- runner and packaging

def build_runner(spec: TargetSpec, out_dir: str | os.PathLike) -> Path:
    """Cross-compile the runner for `spec` (cached) and copy it to ``out_dir/runner``."""
    q = qemu_user(spec)
    arch = q.arch
    cxx = toolchain.require_tool(q.cross_compiler)
    rt = toolchain.runtime_dir(arch)
    src = RUNTIME_SRC / "runner.cc"
    try:
        cxx_version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        raise ToolchainError(f"cannot run {cxx}: {e}") from e
    key = hashlib.sha256(b"\0".join([src.read_bytes(), cxx.encode(), cxx_version.encode(),
                                     json.dumps(toolchain.tvm_versions()).encode()])).hexdigest()[:16]
    cached = toolchain.graphopt_home() / "runner" / f"{arch}-{key}" / "runner"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".runner.{os.getpid()}")
        _log.info("building the %s runner with %s", arch, cxx)
        toolchain.run_tool([cxx, "-std=c++17", "-O2", "-Wall", f"-I{rt / 'include'}", str(src), "-o", str(tmp),
                        f"-L{rt / 'lib'}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi",
                        "-Wl,-rpath,$ORIGIN/lib"], f"compiling the runner with {q.cross_compiler}")
        os.replace(tmp, cached)
    out = Path(out_dir) / "runner"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(cached, out)
    return out


def write_header(path: str | os.PathLike, inputs: Sequence[Any], outputs: Sequence[Any], spec: TargetSpec) -> Path:
    """Write a C header describing the model's inputs and outputs (names, dtypes, shapes, bytes).

    Symbolic dimensions appear as -1 (named in the comment); their tensors' byte size is -1.
    """
    ins, outs = _tensor_entries(inputs, "input"), _tensor_entries(outputs, "output")
    max_ndim = max([1] + [len(e["shape"]) for e in ins + outs])

    def c_str(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def row(e: dict) -> tuple[str, int]:
        dims = [d if isinstance(d, int) else -1 for d in e["shape"]]
        size = _itemsize(e["dtype"])
        nbytes = -1 if size is None or -1 in dims else int(np.prod(dims, dtype=np.int64)) * size
        shape = ", ".join(map(str, dims)) or "0"
        return f'  {{{c_str(e["name"])}, {c_str(e["dtype"])}, {len(dims)}, {{{shape}}}, {nbytes}}},', nbytes

    def listing(entries: list[dict]) -> list[str]:
        return [f" *   {i:<3}{e['name']:<16}{e['dtype']:<9}[{', '.join(map(str, e['shape']))}]"
                for i, e in enumerate(entries)] or [" *   (none)"]

    lines = [
        "/* graphopt_model.h: interface of a model deployed by graphopt (generated; do not edit).",
        " *",
        f" * Target: {spec.name}: {spec.description}",
        " * Files:  model.so (Relax VM library), runner, lib/ (TVM runtime), manifest.json",
        " * Run:    ./runner model.so --manifest manifest.json INPUT_0.bin ... --out-dir OUT",
        " *         inputs are raw little-endian C-order files; outputs land in OUT/output_<i>.bin",
        " *         (nested tuple outputs flattened depth-first).",
        " *",
        " * Inputs:", *listing(ins),
        " * Outputs:", *listing(outs),
        " * A shape entry of -1 is a symbolic dimension, sized at run time; nbytes is then -1.",
        " */",
        "#ifndef GRAPHOPT_MODEL_H_",
        "#define GRAPHOPT_MODEL_H_",
        "",
        "#include <stdint.h>",
        "",
        f"#define GRAPHOPT_TARGET {c_str(spec.name)}",
        f"#define GRAPHOPT_NUM_INPUTS {len(ins)}",
        f"#define GRAPHOPT_NUM_OUTPUTS {len(outs)}",
        f"#define GRAPHOPT_MAX_NDIM {max_ndim}",
        "",
        "typedef struct {",
        "  const char* name;",
        "  const char* dtype; /* e.g. \"float32\", \"int8\" */",
        "  int ndim;",
        "  int64_t shape[GRAPHOPT_MAX_NDIM]; /* -1: symbolic */",
        "  int64_t nbytes; /* -1: depends on symbolic dimensions */",
        "} graphopt_tensor_info;",
    ]
    for kind, entries in (("input", ins), ("output", outs)):
        if not entries:
            continue
        rows = [row(e) for e in entries]
        lines += ["", f"static const graphopt_tensor_info graphopt_{kind}s[GRAPHOPT_NUM_{kind.upper()}S] = {{",
                  *(r for r, _ in rows), "};"]
        lines += [f"#define GRAPHOPT_{kind.upper()}_{i}_NBYTES {nb}" for i, (_, nb) in enumerate(rows)]
    lines += ["", "#endif /* GRAPHOPT_MODEL_H_ */", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def package_arm_artifact(model_so: str | os.PathLike, spec: TargetSpec, inputs_spec: Sequence[Any],
                         outputs_spec: Sequence[Any], out_dir: str | os.PathLike) -> Path:
    """Assemble a deployable folder in `out_dir` (created if needed; the caller renames it into place)."""
    q = qemu_user(spec)
    arch = q.arch
    model_so, out = Path(model_so), Path(out_dir)
    if not model_so.is_file():
        raise ArtifactError(f"model library {model_so} does not exist")
    ins, outs = _tensor_entries(inputs_spec, "input"), _tensor_entries(outputs_spec, "output")
    rt = toolchain.runtime_dir(arch)
    try:
        (out / "lib").mkdir(parents=True, exist_ok=True)
        if model_so.resolve() != (out / "model.so").resolve():
            shutil.copy2(model_so, out / "model.so")
        build_runner(spec, out)
        for lib in DEPLOYED_LIBS:
            shutil.copy2(rt / "lib" / lib, out / "lib" / lib)
        write_header(out / "graphopt_model.h", ins, outs, spec)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": 1,
            "target": spec.name,
            "arch": arch,
            "qemu": {"binary": q.qemu_binary, "cpu": q.qemu_cpu, "sysroot": q.sysroot},
            "runtime_versions": toolchain.tvm_versions(),
            "inputs": ins,
            "outputs": outs,
            "files": {"model": "model.so", "runner": "runner", "header": "graphopt_model.h",
                      "libs": [f"lib/{lib}" for lib in DEPLOYED_LIBS]},
            "run": "./runner model.so --manifest manifest.json " + " ".join(f"{e['name']}.bin" for e in ins),
        }
        write_manifest(out, manifest)
    except OSError as e:
        raise ArtifactError(f"could not write the artifact in {out}: {e}") from e
    return out


# --------------------------------------------------------------------------- emulation

def _check_inputs(inputs: Sequence[Any], manifest: dict | None) -> list[np.ndarray]:
    arrays = []
    for i, x in enumerate(inputs):
        a = np.ascontiguousarray(x)
        if a.dtype.name not in SUPPORTED_DTYPES:
            raise InputError(f"input #{i} has dtype {a.dtype.name}; supported: {', '.join(SUPPORTED_DTYPES)}")
        arrays.append(a)
    if manifest is not None:
        want = manifest.get("inputs", [])
        if len(want) != len(arrays):
            names = ", ".join(e["name"] for e in want)
            raise InputError(f"the model takes {len(want)} inputs ({names}), got {len(arrays)}")
        for i, (a, e) in enumerate(zip(arrays, want, strict=True)):
            dims_ok = len(a.shape) == len(e["shape"]) and all(
                not isinstance(d, int) or d == n for d, n in zip(e["shape"], a.shape, strict=True))
            if a.dtype.name != e["dtype"] or not dims_ok:
                raise InputError(f"input #{i} ({e['name']}): got {a.dtype.name}{list(a.shape)}, "
                                 f"the model wants {e['dtype']}{e['shape']}")
    return arrays


def run_runner(cmd: list[str], cwd: Path, timeout: float, what: str) -> tuple[str, float]:
    """Run a runner program (`toolchain.run_bounded`), its exit codes explained."""
    return toolchain.run_bounded(cmd, cwd, timeout, what, _RUNNER_EXITS)


def _parse_outputs(stdout: str) -> tuple[list[np.ndarray], float | None]:
    outputs, per_ms = [], None
    for line in stdout.splitlines():
        line, _, file = line.partition(" file=")  # the last field: a path, which may hold spaces
        fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv) | ({"file": file} if file else {})
        if line.startswith("output "):
            try:
                dtype = np.dtype(fields["dtype"])
            except TypeError:
                raise ArtifactError(f"the model returned dtype {fields['dtype']}, which numpy cannot read") from None
            shape = tuple(int(d) for d in fields["shape"].split(",") if d)
            outputs.append(np.fromfile(fields["file"], dtype=dtype).reshape(shape))
        elif line.startswith("timing "):
            per_ms = float(fields["per_inference_ms"])
    return outputs, per_ms


def read_count(path: Path) -> int:
    """The instruction count the QEMU plugin wrote to ``path``."""
    try:
        m = re.search(r"insns:\s*(\d+)", path.read_text())
    except OSError:
        m = None
    if not m:
        raise ToolchainError(f"the instruction-counting plugin wrote no count to {path}")
    return int(m.group(1))


def run_emulated(artifact_dir: str | os.PathLike, spec: TargetSpec, inputs: Sequence[np.ndarray], *,
                 repeat: int = 1, count_instructions: bool = False, timeout: float = 600,
                 threads: int = 1) -> EmulatedRun:
    """Run the artifact in `artifact_dir` under QEMU user mode with `inputs`; see `EmulatedRun`.

    The folder needs ``model.so``; its ``runner`` and ``lib/`` are used if present, otherwise the
    cached runner and harvested runtime. ``manifest.json``, if present, is checked against `inputs`.
    `timeout` applies to each QEMU process. Raises ToolchainError on a failed or hung run.
    """
    q = qemu_user(spec)
    arch = q.arch
    if repeat < 1 or threads < 1:
        raise ConfigError(f"repeat and threads must be >= 1, got repeat={repeat}, threads={threads}")
    if count_instructions and threads != 1:
        raise ConfigError("instruction counting needs threads=1 (worker threads spin and share the counter)")
    art = Path(artifact_dir).resolve()
    model = art / "model.so"
    if not model.is_file():
        raise ArtifactError(f"{art} has no model.so")
    manifest = None
    if (art / "manifest.json").exists():
        try:
            manifest = json.loads((art / "manifest.json").read_text())
        except ValueError as e:
            raise ArtifactError(f"{art / 'manifest.json'} is not valid JSON: {e}") from e
    arrays = _check_inputs(inputs, manifest)
    qemu = toolchain.require_tool(q.qemu_binary)
    if not Path(q.sysroot).is_dir():
        package = toolchain.TOOL_PACKAGES.get(q.cross_compiler, q.cross_compiler)
        raise ToolchainError(f"the {arch} sysroot {q.sysroot} is missing; install it with "
                             f"`apt-get install {package}`")

    with tempfile.TemporaryDirectory(prefix="graphopt-emu-") as tmp_name:
        tmp = Path(tmp_name)
        if (art / "runner").is_file() and all((art / "lib" / lib).is_file() for lib in DEPLOYED_LIBS):
            runner = art / "runner"
        else:
            runner = build_runner(spec, tmp)
            (tmp / "lib").symlink_to(toolchain.runtime_dir(arch) / "lib", target_is_directory=True)
        args = []
        for i, a in enumerate(arrays):
            a.tofile(tmp / f"input_{i}.bin")
            args += ["--input", f"input_{i}.bin:{a.dtype.name}:{','.join(map(str, a.shape))}"]
        (tmp / "out").mkdir()
        base = [qemu, "-cpu", q.qemu_cpu, "-L", q.sysroot]
        tail = [str(runner), str(model), *args, "--out-dir", str(tmp / "out"), "--threads", str(threads)]

        plugin, unavailable = None, None
        if count_instructions:
            try:
                plugin = toolchain.ensure_qemu_plugin()
            except ToolchainError as e:
                unavailable = f"instruction counting unavailable: {e}"
                _log.warning(unavailable)

        def plugin_args(name: str) -> list[str]:
            if not plugin:
                return []
            return ["-plugin", f"{toolchain.qemu_option(plugin)},out={toolchain.qemu_option(tmp / name)}"]

        warmup = ["--warmup", "1"] if plugin else []
        stdout, seconds = run_runner([*base, *plugin_args("count_run"), *tail, *warmup, "--repeat", str(repeat)],
                                   tmp, timeout, f"emulated run of {model}")
        outputs, per_ms = _parse_outputs(stdout)
        per_inference = None
        if plugin:
            run_runner([*base, *plugin_args("count_base"), *tail, "--warmup", "1", "--repeat", "0"], tmp, timeout,
                     f"emulated baseline (0 inferences) of {model}")
            delta = read_count(tmp / "count_run") - read_count(tmp / "count_base")
            per_inference = round(delta / repeat)
    return EmulatedRun(outputs=outputs, instructions_per_inference=per_inference, wall_seconds=seconds,
                       emulated_ms_per_inference=per_ms, instructions_unavailable=unavailable)
