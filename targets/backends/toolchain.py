"""External tools and cached runtime pieces that graphopt needs for ARM targets.

- `require_tool(name)`: the absolute path of a compiler or emulator on PATH, or a
  `ToolchainError` naming the Debian package that provides it.
- `graphopt_home()`: the cache folder (``$GRAPHOPT_HOME``, default ``~/.cache/graphopt``).
- `ensure_runtime(arch)` / `runtime_dir(arch)`: the TVM runtime for the *target*
  (``lib/libtvm_runtime*.so``, ``lib/libtvm_ffi.so``, tvm-ffi + dlpack headers), harvested from
  PyPI's manylinux aarch64 wheels of exactly the apache-tvm / apache-tvm-ffi versions installed
  in this Python. A version stamp makes a version change re-harvest.
- `ensure_qemu_plugin()`: the instruction-counting QEMU TCG plugin, built against
  ``qemu-plugin.h`` taken from Debian's ``qemu`` source package of the installed qemu-user
  (Debian ships neither the plugins nor the header). The source is fetched with a private apt
  configuration; nothing system-wide is changed.

Everything is cached under `graphopt_home()`, built in a temporary folder and moved into place
with a rename under a file lock, so concurrent or interrupted runs never see half a result.
Refuses: architectures without aarch64-style wheels (armv7, Cortex-M: they use the
runtime-free C path), and installs where the TVM packages are missing.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from graphopt.errors import ConfigError, ToolchainError

_LOG = logging.getLogger(__name__)

# executable -> Debian package that provides it
TOOL_PACKAGES = {
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "arm-linux-gnueabihf-gcc": "gcc-arm-linux-gnueabihf",
    "arm-linux-gnueabihf-g++": "g++-arm-linux-gnueabihf",
    "arm-none-eabi-gcc": "gcc-arm-none-eabi",
    "arm-none-eabi-nm": "binutils-arm-none-eabi",
    "arm-none-eabi-objcopy": "binutils-arm-none-eabi",
    "arm-linux-gnueabihf-nm": "binutils-arm-linux-gnueabihf",
    "arm-linux-gnueabihf-objcopy": "binutils-arm-linux-gnueabihf",
    "cmake": "cmake",
    "make": "make",
    "qemu-aarch64": "qemu-user",
    "qemu-arm": "qemu-user",
    "qemu-system-arm": "qemu-system-arm",
    "gcc": "gcc",
    "g++": "g++",
    "apt-get": "apt",
    "dpkg-query": "dpkg",
}

# arch -> (pip --platform tag, wheel members kept as lib/<basename>)
_WHEEL_PLATFORMS = {"aarch64": "manylinux_2_28_aarch64"}
_RUNTIME_LIBS = ("tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_runtime_extra.so", "tvm_ffi/lib/libtvm_ffi.so")
_HEADER_PREFIXES = ("tvm_ffi/include/tvm/", "tvm_ffi/include/dlpack/")
_STAMP = "graphopt-runtime.json"


def graphopt_home() -> Path:
    """The cache folder: ``$GRAPHOPT_HOME`` or ``~/.cache/graphopt`` (created on demand)."""
    home = Path(os.environ.get("GRAPHOPT_HOME") or Path.home() / ".cache" / "graphopt").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def require_tool(name: str) -> str:
    """Absolute path of executable `name`, or ToolchainError saying which apt package installs it."""
    path = shutil.which(name)
    if path:
        return path
    pkg = TOOL_PACKAGES.get(name)
    how = f"install it with `apt-get install {pkg}`" if pkg else "install it"
    raise ToolchainError(f"`{name}` was not found on PATH; {how} (scripts/setup.sh installs every tool graphopt needs)")


def tvm_versions() -> dict[str, str]:
    """Installed versions of apache-tvm and apache-tvm-ffi (the harvested runtime must match them)."""
    out = {}
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise ToolchainError(f"{dist} is not installed in this Python ({sys.executable}); run "
                                 "scripts/setup.sh") from None
    return out


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive inter-process lock on ``graphopt_home()/locks/<name>.lock``."""
    locks = graphopt_home() / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _install_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place, replacing an older one (caller holds the lock)."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def linker_args(*args: str | os.PathLike) -> list[str]:
    """``args`` passed to the linker through the compiler driver, each intact: ``-Xlinker`` never
    splits at commas (``-Wl,-Map,/tmp/a,b/x.map`` would hand ld two arguments)."""
    return [x for a in args for x in ("-Xlinker", os.fspath(a))]


def qemu_option(value: str | os.PathLike) -> str:
    """``value`` escaped for a QEMU ``key=value,...`` option string (a comma is written ``,,``)."""
    return os.fspath(value).replace(",", ",,")


def tool_output(stdout: str | None, stderr: str | None, lines: int = 20) -> str:
    """The tool's own message for an error: the tail of its output, plus its first ``error`` line
    when that scrolled out of the tail (warnings before ``-Werror`` diagnostics, long link maps)."""
    text = "\n".join(t.strip() for t in (stderr, stdout) if t and t.strip())
    all_lines = text.splitlines()
    tail = all_lines[-lines:]
    first_error = next((ln for ln in all_lines if re.search(r"\b(error|fatal|cannot|undefined reference)\b", ln, re.I)),
                       None)
    if first_error is not None and first_error not in tail:
        tail = [first_error, "..."] + tail
    return "\n".join(tail) or "(the tool printed nothing)"


def run_tool(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    """Run a build/setup command (an argument list, never a shell string); ToolchainError with the
    tool's own message and the command (shell-quoted, to paste) if it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except OSError as e:
        raise ToolchainError(f"{what}: could not run {cmd[0]}: {e}") from e
    if proc.returncode != 0:
        raise ToolchainError(f"{what} failed (exit {proc.returncode}):\n{tool_output(proc.stdout, proc.stderr)}\n"
                             f"command: {shlex.join(cmd)}")
    return proc


def run_bounded(cmd: list[str], cwd: Path, timeout: float, what: str,
                exit_meanings: dict[int, str] | None = None) -> tuple[str, float]:
    """Run an emulated program in its own process group, killing the whole group at ``timeout``.

    Returns (stdout, seconds). A non-zero exit raises `ToolchainError` with what the exit code
    means (``exit_meanings``), the signal (SIGILL hints at a wrong ``mattr``) and the output's tail.
    """
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    except OSError as e:
        raise ToolchainError(f"{what}: cannot start {cmd[0]}: {e}") from e
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ToolchainError(f"{what} did not finish within {timeout:g} s and was killed (a hung program, or raise "
                             "the timeout for a big model: emulation is ~10x slower than the device)") from None
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = tool_output(stdout, stderr)
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            hint = " (the code uses an instruction this CPU lacks: check the target's mattr)" if sig == "SIGILL" else ""
            why = f"was killed by {sig}{hint}"
        else:
            why = f"failed with exit code {proc.returncode} ({(exit_meanings or {}).get(proc.returncode, 'error')})"
        raise ToolchainError(f"{what} {why}:\n{tail}\ncommand: {shlex.join(cmd)}")
    return stdout, seconds


# --------------------------------------------------------------------------- TVM target runtime

def _runtime_path(arch: str) -> Path:
    if arch not in _WHEEL_PLATFORMS:
        raise ConfigError(f"no TVM runtime wheels exist for arch {arch!r} (supported: {sorted(_WHEEL_PLATFORMS)}); "
                          "armv7 and Cortex-M targets use the runtime-free C path instead")
    return graphopt_home() / "runtime" / arch


def _stamp_ok(path: Path, versions: dict[str, str]) -> bool:
    try:
        return json.loads((path / _STAMP).read_text()).get("versions") == versions
    except (OSError, ValueError):
        return False


def runtime_dir(arch: str = "aarch64") -> Path:
    """The harvested runtime folder (``lib/``, ``include/``) for `arch`, matching the installed TVM.

    Raises ToolchainError if it is missing or was harvested for other TVM versions.
    """
    path = _runtime_path(arch)
    if not _stamp_ok(path, tvm_versions()):
        raise ToolchainError(f"the {arch} TVM runtime is missing or stale in {path}; run `graphopt setup-runtime`")
    return path


def ensure_runtime(arch: str = "aarch64") -> Path:
    """Harvest the target TVM runtime from PyPI's wheels if needed; return `runtime_dir(arch)`.

    Idempotent: returns at once when the stamp matches the installed versions.
    """
    path = _runtime_path(arch)
    versions = tvm_versions()
    if _stamp_ok(path, versions):
        return path
    with _locked(f"runtime-{arch}"):
        if _stamp_ok(path, versions):
            return path
        pins = [f"{dist}=={ver}" for dist, ver in versions.items()]
        _LOG.info(f"harvesting the {arch} TVM runtime from PyPI wheels: {' '.join(pins)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=path.parent))
        try:
            wheels = tmp / "wheels"
            run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                      "--platform", _WHEEL_PLATFORMS[arch], "--python-version", "3.11", "--implementation", "cp",
                      "--abi", "cp311", "--disable-pip-version-check", "-d", str(wheels), *pins],
                     f"downloading the {arch} TVM wheels")
            out = tmp / "runtime"
            _extract_runtime(sorted(wheels.glob("*.whl")), out)
            (out / _STAMP).write_text(json.dumps({"arch": arch, "versions": versions}, indent=1))
            _install_dir(out, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _LOG.info(f"{arch} TVM runtime ready in {path}")
    return path


def _extract_runtime(wheels: list[Path], out: Path) -> None:
    """Copy the runtime libraries and tvm-ffi/dlpack headers out of the downloaded wheels."""
    (out / "lib").mkdir(parents=True)
    (out / "include").mkdir()
    found = set()
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for member in zf.namelist():
                if member in _RUNTIME_LIBS:
                    dest = out / "lib" / Path(member).name
                elif member.startswith(_HEADER_PREFIXES) and not member.endswith("/"):
                    dest = out / "include" / member[len("tvm_ffi/include/"):]
                else:
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found.add(member)
    needed = {"tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"}
    if not needed <= found or not (out / "include" / "tvm" / "ffi" / "function.h").exists():
        lacking = sorted(needed - found) or "tvm-ffi headers"
        raise ToolchainError(f"the downloaded wheels {[w.name for w in wheels]} lack {lacking}")


# --------------------------------------------------------------------------- QEMU TCG plugin

def plugin_source() -> Path:
    """The instruction-counting plugin's C source shipped with graphopt."""
    return Path(__file__).resolve().parent / "runtime" / "insncount.c"


def _qemu_source_version() -> str:
    """Debian source version of the installed qemu-user, e.g. ``1:7.2+dfsg-7+deb12u18``."""
    proc = subprocess.run([require_tool("dpkg-query"), "-W", "-f=${source:Package} ${source:Version}", "qemu-user"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError("qemu-user is not installed (dpkg knows no such package); install it with "
                             "`apt-get install qemu-user`")
    name, _, version = proc.stdout.strip().partition(" ")
    if name != "qemu" or not version:
        raise ToolchainError(f"unexpected qemu-user source package {proc.stdout.strip()!r}")
    return version


def _deb_src_entries() -> tuple[str, str]:
    """(one-line list, deb822 text) of Debian *source* entries mirroring the machine's binary ones."""
    blocks = []
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for block in re.split(r"\n\s*\n", f.read_text()):
            if re.search(r"^Types:.*\bdeb\b", block, re.M) and "debian" in block:
                blocks.append(re.sub(r"^Types:.*$", "Types: deb-src", block.strip(), flags=re.M))
    legacy = Path("/etc/apt/sources.list")
    lines = [re.sub(r"^\s*deb\s", "deb-src ", ln) for ln in (legacy.read_text().splitlines() if legacy.exists() else [])
             if re.match(r"\s*deb\s", ln) and "debian" in ln]
    if not blocks and not lines:
        raise ToolchainError("found no Debian entries in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list "
                             "to derive deb-src entries from")
    return "\n".join(lines) + "\n", "\n\n".join(blocks) + "\n"


def _fetch_plugin_header(dest: Path, version: str) -> None:
    """Download Debian's qemu source with a private apt configuration; copy qemu-plugin.h to `dest`."""
    apt_get = require_tool("apt-get")
    with tempfile.TemporaryDirectory(prefix="graphopt-apt-") as tmp:
        t = Path(tmp)
        for d in ("etc/sources.list.d", "lists/partial", "cache/archives/partial", "src"):
            (t / d).mkdir(parents=True)
        one_line, deb822 = _deb_src_entries()
        (t / "etc" / "sources.list").write_text(one_line)
        (t / "etc" / "sources.list.d" / "debian-src.sources").write_text(deb822)
        opts = ["-q", "-o", f"Dir::Etc::SourceList={t / 'etc' / 'sources.list'}",
                "-o", f"Dir::Etc::SourceParts={t / 'etc' / 'sources.list.d'}",
                "-o", f"Dir::State::Lists={t / 'lists'}", "-o", f"Dir::Cache={t / 'cache'}"]
        if os.geteuid() == 0:  # the private folders are root's: download as root, not as _apt
            opts += ["-o", "APT::Sandbox::User=root"]
        _LOG.info(f"fetching Debian's qemu {version} source for qemu-plugin.h (private apt configuration)")
        run_tool([apt_get, *opts, "update"], "apt-get update (private deb-src lists)")
        try:
            run_tool([apt_get, *opts, "source", "--download-only", f"qemu={version}"], "apt-get source qemu",
                     cwd=t / "src")
        except ToolchainError:
            _LOG.info(f"qemu {version} source not available; taking the newest qemu source")
            run_tool([apt_get, *opts, "source", "--download-only", "qemu"], "apt-get source qemu", cwd=t / "src")
        origs = sorted((t / "src").glob("qemu_*.orig.tar.*"))
        if not origs:
            raise ToolchainError(f"apt-get source qemu produced no orig tarball in {t / 'src'}")
        with tarfile.open(origs[0]) as tf:
            member = next((m for m in tf.getmembers() if m.name.endswith("include/qemu/qemu-plugin.h")), None)
            if member is None:
                raise ToolchainError(f"{origs[0].name} contains no include/qemu/qemu-plugin.h")
            header = tf.extractfile(member)
            if header is None:
                raise ToolchainError(f"{origs[0].name}: {member.name} is not a regular file")
            dest.write_bytes(header.read())


def ensure_qemu_plugin() -> Path:
    """Build (once) and return the instruction-counting plugin ``libinsncount.so``.

    Cached in ``graphopt_home()/qemu-plugin/`` keyed by the qemu source version, the plugin
    source and the host compiler. Raises ToolchainError when the header cannot be fetched or
    the plugin does not compile.
    """
    gcc = require_tool("gcc")
    src = plugin_source()
    if not src.exists():
        raise ToolchainError(f"plugin source {src} is missing from the graphopt installation")
    base = graphopt_home() / "qemu-plugin"
    base.mkdir(exist_ok=True)
    header_dir = base / "include"
    with _locked("qemu-plugin"):
        stamp = header_dir / "qemu-version"
        version = _qemu_source_version()
        if not (stamp.exists() and stamp.read_text() == version and (header_dir / "qemu-plugin.h").exists()):
            tmp = Path(tempfile.mkdtemp(prefix=".include-", dir=base))
            try:
                _fetch_plugin_header(tmp / "qemu-plugin.h", version)
                (tmp / "qemu-version").write_text(version)
                _install_dir(tmp, header_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        key = hashlib.sha256(src.read_bytes() + (header_dir / "qemu-plugin.h").read_bytes()
                             + gcc.encode()).hexdigest()[:16]
        lib = base / f"libinsncount-{key}.so"
        if not lib.exists():
            tmp_lib = base / f".{lib.name}.{os.getpid()}"
            run_tool([gcc, "-shared", "-fPIC", "-O2", "-Wall", f"-I{header_dir}", str(src), "-o", str(tmp_lib)],
                     "building the QEMU instruction-counting plugin")
            os.replace(tmp_lib, lib)
    return lib
