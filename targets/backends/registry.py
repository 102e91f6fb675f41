"""Which backend builds and runs a target's artifacts: one per `Runtime`.

`graphopt.compile` and `CompiledModel` only talk to `backend_for(spec)`, so a new kind of artifact
plugs in with `register_backend` and no change to the API. The built-in backends are listed in
`BUILTIN`, one line per runtime. Refuses (`ConfigError`): a runtime with no backend.
"""
from __future__ import annotations

from collections.abc import Callable

from graphopt.errors import ConfigError
from graphopt.targets.backends.base import Backend
from graphopt.targets.backends.c_library import CLibraryBackend
from graphopt.targets.backends.tvm_vm import EmulatedVM, NativeVM
from graphopt.targets.spec import Runtime, TargetSpec

BUILTIN: dict[Runtime, Callable[[], Backend]] = {
    Runtime.TVM_VM_NATIVE: NativeVM,  # model.so loaded in-process
    Runtime.TVM_VM_QEMU_USER: EmulatedVM,  # cross-compiled model.so + C++ runner under qemu-user
    Runtime.C_LIBRARY_QEMU_USER: CLibraryBackend,  # runtime-free C library, Linux user mode (armv7, arm-*-c)
    Runtime.C_LIBRARY_QEMU_SYSTEM: CLibraryBackend,  # runtime-free C library, bare metal (Cortex-M)
}
_BACKENDS: dict[Runtime, Backend | Callable[[], Backend]] = dict(BUILTIN)


def register_backend(runtime: Runtime, backend: Backend | Callable[[], Backend]) -> None:
    """Build and run artifacts of ``runtime`` with ``backend`` (an instance, or a factory called once)."""
    _BACKENDS[runtime] = backend


def backend_for(spec: TargetSpec) -> Backend:
    entry = _BACKENDS.get(spec.runtime)
    if entry is None:
        raise ConfigError(f"target {spec.name!r} uses runtime {spec.runtime.value!r}, for which no backend is "
                          f"registered (have: {sorted(r.value for r in _BACKENDS)}).")
    if not isinstance(entry, Backend):
        entry = _BACKENDS[spec.runtime] = entry()
    return entry
