"""Artifact backends and runtimes: how a lowered model becomes files on disk and runs.

`registry.backend_for(spec)` picks the backend for a target's `Runtime`: the TVM VM library
(`tvm_vm`, host and aarch64 under qemu-user via `emulation`) or the runtime-free C library
(`c_emitter` + `c_library`, Cortex-M and armv7). `toolchain` finds compilers and emulators and
caches the aarch64 TVM runtime; `runtime/` holds the C/C++ runners and harnesses they build.
"""
