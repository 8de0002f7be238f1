"""How much memory this machine can give a new process now, from ``/proc/meminfo``.

A receiver checks a Layout against it before a restore guest faults its region in: without
swap, a region larger than ``MemAvailable`` ends with the OOM killer, not with a clean refusal.
"""

from __future__ import annotations

MEMINFO = "/proc/meminfo"


def mem_available() -> int | None:
    """``MemAvailable`` in bytes (the kernel's estimate of memory available without swapping),
    or None where the kernel does not report it."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
