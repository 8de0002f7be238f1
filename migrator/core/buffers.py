"""Reusable page buffers, so that a round does not fault in fresh memory for every chunk.

On a VM with free-page reporting, touching fresh memory costs up to ~2 s per GiB (see
``shared/kernel-abi.md``): a round that read each chunk into a new bytearray paid that for every
byte it moved. A buffer goes back to the pool once nothing views it any more: the transport holds
memoryview slices of a chunk until its frames are on the wire, and each live view keeps one extra
reference on the buffer (through its managed buffer). Whether that reference is visible is
checked once per interpreter (``_REFS_FREE``); where it is not, the pool simply allocates.
"""

from __future__ import annotations

import sys


def _probe() -> int | None:
    """The refcount ``take`` sees for a buffer nobody views, or None if views don't show."""
    pool = [bytearray(16)]

    def seen() -> int:
        for buf in pool:
            return sys.getrefcount(buf)
        raise AssertionError

    free = seen()
    view = memoryview(pool[0])[4:8]
    viewed = seen()
    del view
    return free if viewed > free == seen() else None


_REFS_FREE = _probe()


class BufferPool:
    """Hands out ``bytearray(size)`` buffers, reusing ones that no memoryview holds any more."""

    def __init__(self, size: int, *, keep: int = 16) -> None:
        self.size = size
        self.keep = keep
        self._buffers: list[bytearray] = []
        self.allocated = 0

    def take(self) -> bytearray:
        if _REFS_FREE is not None:
            for buf in self._buffers:
                if sys.getrefcount(buf) == _REFS_FREE:
                    return buf
        buf = bytearray(self.size)
        self.allocated += 1
        if len(self._buffers) < self.keep:
            self._buffers.append(buf)
        return buf


class SizedBufferPool:
    """Writable views of exactly the size asked for (received frames vary in size), cut from
    buffers that are reused once no view of them is alive, like ``BufferPool``'s.

    A free buffer serves a request it fits, unless it is over twice as large. When none fits, a
    new one (rounded up to ``granule``) is made; it takes the place of a free buffer once
    ``keep`` are held, so the pool follows a change of sizes instead of clinging to old ones.
    """

    def __init__(self, *, keep: int = 24, granule: int = 64 << 10) -> None:
        self.keep = keep
        self.granule = granule
        self._buffers: list[bytearray] = []
        self.allocated = 0

    def take(self, size: int) -> memoryview:
        fit = spare = None
        if _REFS_FREE is not None:
            for buf in self._buffers:
                if sys.getrefcount(buf) == _REFS_FREE:
                    if size <= len(buf) <= 2 * size:
                        fit = buf
                        break
                    spare = buf
        if fit is None:
            fit = bytearray(-(-size // self.granule) * self.granule)
            self.allocated += 1
            if len(self._buffers) < self.keep:
                self._buffers.append(fit)
            elif spare is not None:
                index = next(i for i, buf in enumerate(self._buffers) if buf is spare)
                self._buffers[index] = fit
        return memoryview(fit)[:size]
