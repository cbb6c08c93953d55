"""What ptxas says about each kernel it compiled: registers, spills, stack.

XLA logs ptxas' verbose output when started with
``TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=subprocess_compilation=2`` (set
before JAX is imported); ``parse`` reads that log.
"""

from __future__ import annotations

import re
from typing import NamedTuple

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
