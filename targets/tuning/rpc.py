"""TVM RPC device farms: a local tracker, and an emulated aarch64 board registered with a tracker.

Real boards join a tracker by running TVM's own server on the board
(``python -m tvm.exec.rpc_server --tracker HOST:9190 --key rk3399``); `graphopt.tune` then
measures on them through `graphopt.RPCRunner`. This module adds what tests and users without a
board need:

- `LocalTracker(port=None)`: ``python -m tvm.exec.rpc_tracker`` on 127.0.0.1 (a free port by
  default), in its own process group, killed on exit.
- `EmulatedDevice(spec, tracker=("127.0.0.1", port), key=...)`: a device whose sessions run under
  ``qemu-<arch> -cpu <spec.qemu_cpu>``. A host-side Python process speaks the tracker and
  handshake protocol; each accepted session socket is handed (by fd) to ``runtime/rpc_device.cc``,
  an aarch64 program running TVM's ``rpc.ServerLoop`` under qemu, linked with the harvested
  ``libtvm_runtime`` + ``libtvm_runtime_extra``. One session at a time, like TVM's server; a
  session past its ``-timeout`` is killed.
  Timings measured on it are EMULATED: they prove the path, they are not the board's speed.
- `serve(spec, tracker, key)`: the device loop itself (``graphopt rpc-device`` runs it). The
  device tells the tracker it is emulated; `emulated_devices(tracker, key)` reads that back so
  `graphopt.tune` labels such timings as not real speeds.

Refuses (`ConfigError`/`ToolchainError`): targets that do not run TVM VM code under qemu-user, a
malformed tracker address, missing cross compiler / qemu / sysroot, a tracker or device that does
not come up within its timeout.
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from graphopt.errors import ConfigError, ToolchainError
from graphopt.targets.backends import toolchain
from graphopt.targets.backends.emulation import RUNTIME_SRC, qemu_user
from graphopt.targets.spec import TargetSpec

EMULATED_NOTE = "EMULATED under qemu: timings prove the RPC path, they are not the board's real speed"
_PING_SECONDS = 2.0
_UNUSED_KEY_SECONDS = 6.0  # a match key handed out by the tracker but never used is replaced


def parse_tracker(tracker: str | tuple[str, int]) -> tuple[str, int]:
    """("host", port) from ``"host:port"`` or a (host, port) pair."""
    if isinstance(tracker, tuple) and len(tracker) == 2 and isinstance(tracker[1], int):
        return str(tracker[0]), tracker[1]
    host, _, port = str(tracker).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"tracker must look like '127.0.0.1:9190', got {tracker!r}")
    return host, int(port)


def build_rpc_device(spec: TargetSpec) -> Path:
    """The cross-compiled ``rpc_device`` for `spec` (cached by source, compiler and TVM versions)."""
    q = qemu_user(spec)
    arch = q.arch
    cxx = toolchain.require_tool(q.cross_compiler)
    rt = toolchain.ensure_runtime(arch)
    src = RUNTIME_SRC / "rpc_device.cc"
    key = hashlib.sha256(b"\0".join([src.read_bytes(), cxx.encode(), str(rt).encode(),
                                     json.dumps(toolchain.tvm_versions()).encode()])).hexdigest()[:16]
    out = toolchain.graphopt_home() / "rpc-device" / f"{arch}-{key}" / "rpc_device"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".rpc_device.{os.getpid()}")
        toolchain.run_tool([cxx, "-std=c++17", "-O2", "-Wall", f"-I{rt / 'include'}", str(src), "-o", str(tmp),
                            f"-L{rt / 'lib'}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_runtime_extra",
                            "-ltvm_ffi", *toolchain.linker_args("-rpath", rt / "lib")],
                           f"compiling the RPC device server with {q.cross_compiler}")
        os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- the device loop

def emulated_devices(tracker: str | tuple[str, int], key: str, timeout: float = 10) -> list[str]:
    """How each device queued under `key` at `tracker` is emulated (empty: real boards only).

    Raises ToolchainError if the tracker cannot be reached within `timeout` seconds.
    """
    from tvm import rpc

    host, port = parse_tracker(tracker)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        servers = rpc.connect_tracker(host, port).summary().get("server_info", [])
    except (OSError, RuntimeError) as e:
        raise ToolchainError(f"cannot reach the RPC tracker at {host}:{port}: {e}") from e
    return [s["emulated"] for s in servers if s.get("key") == "server:" + key and s.get("emulated")]


def _register(tracker: tuple[str, int], key: str, port: int, emulated: str) -> socket.socket:
    from tvm.rpc import base

    try:
        conn = socket.create_connection(tracker, timeout=30)
    except OSError as e:
        raise ToolchainError(f"cannot reach the RPC tracker at {tracker[0]}:{tracker[1]}: {e}") from e
    conn.settimeout(None)
    conn.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
    if struct.unpack("<i", base.recvall(conn, 4))[0] != base.RPC_TRACKER_MAGIC:
        raise ToolchainError(f"{tracker[0]}:{tracker[1]} is not a TVM RPC tracker")
    base.sendjson(conn, [base.TrackerCode.UPDATE_INFO, {"key": "server:" + key, "addr": [None, port],
                                                       "emulated": emulated}])
    if base.recvjson(conn) != base.TrackerCode.SUCCESS:
        raise ToolchainError(f"the tracker refused device key {key!r}")
    return conn


def _put(tconn: socket.socket, key: str, port: int, used: set) -> str:
    from tvm.rpc import base

    matchkey = base.random_key(key, cmap=used)
    used.add(matchkey)
    base.sendjson(tconn, [base.TrackerCode.PUT, key, [port, matchkey], None])
    if base.recvjson(tconn) != base.TrackerCode.SUCCESS:
        raise ToolchainError(f"the tracker refused to queue device key {key!r}")
    return matchkey


def _accept(listen: socket.socket, tconn: socket.socket, key: str, port: int):
    """Wait for a client holding our current match key; returns (socket, session timeout or None)."""
    from tvm.rpc import base

    used: set = set()
    matchkey = _put(tconn, key, port, used)
    unused = 0.0
    while True:
        if listen not in select.select([listen], [], [], _PING_SECONDS)[0]:
            base.sendjson(tconn, [base.TrackerCode.GET_PENDING_MATCHKEYS])
            unused = 0.0 if matchkey in base.recvjson(tconn) else unused + _PING_SECONDS
            if unused > _UNUSED_KEY_SECONDS:
                matchkey, unused = _put(tconn, key, port, used), 0.0
            continue
        conn, _ = listen.accept()
        try:
            if struct.unpack("<i", base.recvall(conn, 4))[0] != base.RPC_MAGIC:
                conn.close()
                continue
            words = base.recvall(conn, struct.unpack("<i", base.recvall(conn, 4))[0]).decode().split()
        except (OSError, struct.error, RuntimeError):
            conn.close()
            continue
        if not words or words[0] != "client:" + matchkey:
            conn.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
            conn.close()
            continue
        server_key = ("server:" + key).encode()
        conn.sendall(struct.pack("<ii", base.RPC_CODE_SUCCESS, len(server_key)) + server_key)
        timeout = next((float(w[len("-timeout="):]) for w in words[1:] if w.startswith("-timeout=")), None)
        return conn, timeout


def _run_session(conn: socket.socket, spec: TargetSpec, exe: Path, timeout: float | None) -> None:
    """Serve one session on `conn` with ``rpc_device`` under qemu; kill it at `timeout`.

    qemu stays in this process's group, so killing the device's group ends its session too."""
    from tvm.rpc import _ffi_api

    q = qemu_user(spec)
    work = tempfile.mkdtemp(prefix="graphopt-rpc-")
    fd = conn.fileno()
    env = dict(os.environ, TVM_NUM_THREADS=str(spec.num_cores or 1))
    proc = subprocess.Popen([q.qemu_binary, "-cpu", q.qemu_cpu, "-L", q.sysroot, str(exe), str(fd), work],
                            cwd=work, pass_fds=(fd,), env=env)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _ffi_api.ReturnException(fd, f"RPCSessionTimeoutError: the {timeout:g} s session on the emulated "
                                     "device expired; raise session_timeout")
        proc.kill()
        proc.wait()
    finally:
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


def serve(spec: TargetSpec, tracker: str | tuple[str, int], key: str, *, host: str = "127.0.0.1",
          ready=None) -> None:
    """Register an emulated `spec` device with `tracker` under `key` and serve sessions forever.

    `host` is the address sessions connect to (``0.0.0.0`` when the tracker is on another
    machine); `ready(port)` is called once the device is queued. Emulated timings are not real
    speeds.
    """
    tracker = parse_tracker(tracker)
    if not key:
        raise ConfigError("the device needs a key (the name RPCRunner asks the tracker for)")
    exe = build_rpc_device(spec)
    q = qemu_user(spec)
    toolchain.require_tool(q.qemu_binary)
    if not Path(q.sysroot).is_dir():
        raise ToolchainError(f"the sysroot {q.sysroot} is missing; install "
                             f"{toolchain.TOOL_PACKAGES.get(q.cross_compiler, q.cross_compiler)}")
    listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listen.bind((host, 0))
    listen.listen(4)
    port = listen.getsockname()[1]
    tconn = _register(tracker, key, port, f"{q.qemu_binary} -cpu {q.qemu_cpu}")
    if ready is not None:
        ready(port)
    while True:
        conn, timeout = _accept(listen, tconn, key, port)
        _run_session(conn, spec, exe, timeout)


# --------------------------------------------------------------------------- context managers

def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None, log=None) -> None:
    """Kill `proc`'s whole process group (qemu sessions included) and close its log."""
    if proc is not None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if log is not None:
        log.close()


def _tail(log) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


def _queued(tracker: tuple[str, int], key: str) -> bool:
    from tvm import rpc

    try:
        info = rpc.connect_tracker(*tracker).summary()
    except (OSError, RuntimeError):
        return False
    return info.get("queue_info", {}).get(key, {}).get("free", 0) > 0


class LocalTracker:
    """``python -m tvm.exec.rpc_tracker`` on `host` (loopback by default) for the ``with`` block."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", timeout: float = 60):
        self.host, self.port, self.timeout = host, port or _free_port(host), timeout
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> LocalTracker:
        from tvm import rpc

        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", self.host,
                                       "--port", str(self.port), "--port-end", str(self.port + 1), "--silent"],
                                      stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                why = _tail(self._log)
                _stop(self._proc, self._log)
                raise ToolchainError(f"the RPC tracker exited: {why}")
            try:
                socket.create_connection((self.host, self.port), timeout=2).close()
            except OSError:
                time.sleep(0.3)
                continue
            rpc.connect_tracker(self.host, self.port).summary()  # the port speaks the tracker protocol
            return self
        _stop(self._proc, self._log)
        raise ToolchainError(f"the RPC tracker did not start on {self.address} within {self.timeout:g} s")

    def __exit__(self, *exc) -> None:
        _stop(self._proc, self._log)


class EmulatedDevice:
    """An emulated `spec` board registered with `tracker` under `key` for the ``with`` block.

    Runs `serve` in a child process (``graphopt rpc-device``) in its own process group; on exit the
    group (with any qemu session) is killed and its temporary folder removed. Measurements on it
    are EMULATED timings, not real speeds.
    """

    def __init__(self, spec: TargetSpec, tracker: str | tuple[str, int] = ("127.0.0.1", 9190),
                 key: str = "emulated-a53", timeout: float = 120):
        qemu_user(spec)
        self.spec, self.tracker, self.key, self.timeout = spec, parse_tracker(tracker), key, timeout
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._tmp: str | None = None  # the child's TMPDIR: session folders of a killed device go with it

    def __enter__(self) -> EmulatedDevice:
        build_rpc_device(self.spec)  # build errors surface here, not in the child
        host, port = self.tracker
        self._log = tempfile.TemporaryFile()
        self._tmp = tempfile.mkdtemp(prefix="graphopt-device-")
        self._proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", "rpc-device", "--target", self.spec.name,
                                       "--tracker", f"{host}:{port}", "--key", self.key],
                                      stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True,
                                      env=dict(os.environ, TMPDIR=self._tmp))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                why = _tail(self._log)
                self._stop()
                raise ToolchainError(f"the emulated device exited: {why}")
            if _queued(self.tracker, self.key):
                return self
            time.sleep(0.5)
        self._stop()
        raise ToolchainError(f"the emulated device did not register with {host}:{port} within {self.timeout:g} s")

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        _stop(self._proc, self._log)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
