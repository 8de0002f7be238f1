"""The guest's memory: one mapping, private anonymous (default) or a shared memfd.

A memfd lets a migrator map the same pages and read them without process_vm_readv, and lets a
destination write a restore guest's pages directly. A restore guest pre-faults its mapping: on
this VM touching fresh memory costs up to ~2 s per GiB, which must not land in the downtime nor
hold up round 0. So it populates in a background thread with MADV_POPULATE_WRITE (Linux 5.14+),
which faults pages in without changing their contents and so may race with the destination
writing pages into them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

from ..core.model import Region
from ..native.workload import ffi
from ..tracker import MADV_POPULATE_WRITE

POPULATE_CHUNK = 64 << 20
_libc = ctypes.CDLL(None, use_errno=True)


class RegionMapping:
    """``size`` bytes of fresh, zero memory at a fixed address for the life of the process."""

    def __init__(self, size: int, *, memfd: bool = False) -> None:
        self.memfd: int | None = None
        if memfd:
            self.memfd = os.memfd_create("migrator-guest", os.MFD_CLOEXEC)
            os.ftruncate(self.memfd, size)
            self._map = mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED)
        else:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        self.size = size
        self._populating: threading.Thread | None = None
        self.pointer = ffi.cast("uint8_t *", ffi.from_buffer(self._map))  # keeps the map exported
        self.region = Region(int(ffi.cast("uintptr_t", self.pointer)), size)

    def populate_in_background(self) -> threading.Thread:
        """Fault the whole mapping in from a daemon thread (ctypes releases the GIL)."""

        def populate() -> None:
            base = int(ffi.cast("uintptr_t", self.pointer))
            for offset in range(0, self.size, POPULATE_CHUNK):
                length = min(POPULATE_CHUNK, self.size - offset)
                if _libc.madvise(ctypes.c_void_p(base + offset), ctypes.c_size_t(length), MADV_POPULATE_WRITE):
                    return  # an old kernel: pages fault in on first write instead

        thread = self._populating = threading.Thread(target=populate, name="populate", daemon=True)
        thread.start()
        return thread

    def wait_populated(self, timeout: float) -> bool:
        """Wait for the background fault-in (if any) to end; False if it is still running."""
        if self._populating is not None:
            self._populating.join(timeout)
        return self.populated is not False

    @property
    def populated(self) -> bool | None:
        """None if nothing populates this mapping, else whether the background fault-in is done."""
        return None if self._populating is None else not self._populating.is_alive()

    @property
    def buffer(self) -> memoryview:
        """The region's bytes (live: they change while the workload runs)."""
        return memoryview(self._map)
