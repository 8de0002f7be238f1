"""The guest's memory: one mapping, private anonymous (default) or a shared memfd.

A memfd lets a migrator map the same pages and read them without process_vm_readv, and lets a
destination write a restore guest's pages directly. A restore guest pre-faults its mapping
(MAP_POPULATE): on this VM, touching fresh memory during the final copy costs up to ~2 s per GiB.
"""

from __future__ import annotations

import mmap
import os

from ..model import Region
from ._workload import ffi


class RegionMapping:
    """``size`` bytes of fresh, zero memory at a fixed address for the life of the process."""

    def __init__(self, size: int, *, memfd: bool = False, populate: bool = False) -> None:
        flags = mmap.MAP_POPULATE if populate else 0
        self.memfd: int | None = None
        if memfd:
            self.memfd = os.memfd_create("migrator-guest", os.MFD_CLOEXEC)
            os.ftruncate(self.memfd, size)
            self._map = mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED | flags)
        else:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | flags)
        self.size = size
        self.pointer = ffi.cast("uint8_t *", ffi.from_buffer(self._map))  # keeps the map exported
        self.region = Region(int(ffi.cast("uintptr_t", self.pointer)), size)

    @property
    def buffer(self) -> memoryview:
        """The region's bytes (live: they change while the workload runs)."""
        return memoryview(self._map)
