"""Board memory maps: where each emulated board's code and data regions start, and how large they are.

The sizes are the emulated machine's memory, which graphopt's test harness runs in; the library
itself must fit the target's `TargetSpec.flash_bytes` / `ram_bytes` (the device's budget, which
may be smaller). Backends that link firmware (`graphopt.targets.backends.c_library`) read the
maps here, so a new board is one line. A board that is not listed can still be built for, not run.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryMap:
    code_origin: int  # code + constants (flash, or ITCM on the MPS3 AN547)
    data_origin: int  # .data, .bss, heap and stack (SRAM, or DTCM)
    code_bytes: int  # the emulated code region's size
    data_bytes: int  # the emulated data region's size


# QEMU machine -> memory map
BOARDS: dict[str, MemoryMap] = {
    "mps2-an386": MemoryMap(0x0, 0x2000_0000, 4 << 20, 4 << 20),  # Cortex-M4, 4 MiB SSRAM each
    "mps2-an500": MemoryMap(0x0, 0x2000_0000, 4 << 20, 4 << 20),  # Cortex-M7
    "mps3-an547": MemoryMap(0x0, 0x2000_0000, 512 << 10, 512 << 10),  # Cortex-M55: 512 KiB ITCM, 512 KiB DTCM
}
