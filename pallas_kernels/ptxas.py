"""What ptxas says about each kernel it compiled: registers, spills, stack.

XLA logs ptxas' verbose output to stderr when started with
``TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=subprocess_compilation=2`` (set
before JAX is imported); ``parse`` reads that log and ``compile_reports``
compiles a lowered program while capturing it.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, NamedTuple

_ENTRY = re.compile(
    r"Function properties for (?P<name>\w+)\n"
    r"\s*(?P<stack>\d+) bytes stack frame, (?P<spill_stores>\d+) bytes spill stores, "
    r"(?P<spill_loads>\d+) bytes spill loads\n"
    r"[^\n]*Used (?P<registers>\d+) registers"
)

# Registers are allocated per warp in units of 256 (8 per thread).
_REGISTER_GRANULE = 8


class KernelReport(NamedTuple):
    name: str
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int
    stack: int

    def resident_warps(self, registers_per_sm: int) -> int:
        """Warps an SM can hold at this register count (other limits aside)."""
        per_thread = -(-self.registers // _REGISTER_GRANULE) * _REGISTER_GRANULE
        return registers_per_sm // (per_thread * 32)


def parse(log: str) -> dict[str, KernelReport]:
    """Kernel name -> its report (the last one when a name repeats)."""
    out = {}
    for m in _ENTRY.finditer(log):
        out[m["name"]] = KernelReport(
            m["name"],
            int(m["registers"]),
            int(m["spill_stores"]),
            int(m["spill_loads"]),
            int(m["stack"]),
        )
    return out


def compile_reports(lowered: Any) -> dict[str, KernelReport]:
    """Compiles ``lowered`` (a ``jax.stages.Lowered``) and returns ptxas' report
    of each kernel, read from stderr at the file-descriptor level (XLA logs
    from C++, past Python's ``sys.stderr``)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            lowered.compile()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return parse(log.read())


def problems(
    reports: dict[str, KernelReport], kernels: tuple[str, ...], registers_per_sm: int
) -> list[str]:
    """What is wrong with the kernels' reports: missing, spilling, or so many
    registers that fewer than 8 warps (2 warp groups) fit on an SM."""
    out = []
    for name in kernels:
        r = reports.get(name)
        if r is None:
            out.append(f"{name}: no ptxas report")
        elif r.spill_stores:
            out.append(f"{name}: {r.spill_stores} bytes of spill stores ({r.registers} registers)")
        elif r.resident_warps(registers_per_sm) < 8:
            out.append(f"{name}: {r.registers} registers leave room for under 8 warps per SM")
    return out
