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

    The smallest free buffer that holds a request serves it, however much larger: a late
    round's frames vary in size from round to round, and a fresh buffer costs its page faults on
    the receive path (on this VM more than the frame's transfer), so a free one is always
    better. When none is large enough, a new one (rounded up to ``granule``) is made; it takes
    the place of the smallest free buffer once ``keep`` are held, so the pool grows with the
    frames instead of clinging to small buffers.
    """

    def __init__(self, *, keep: int = 24, granule: int = 64 << 10) -> None:
        self.keep = keep
        self.granule = granule
        self._buffers: list[bytearray] = []
        self.allocated = 0

    def warm(self, count: int, size: int) -> None:
        """Hold ``count`` free buffers of ``size`` bytes now (their page faults taken here), so
        that the first frames of a session are received at full speed."""
        views = [self.take(size) for _ in range(min(count, self.keep))]   # all taken at once: distinct
        del views

    def take(self, size: int) -> memoryview:
        fit = spare = None
        if _REFS_FREE is not None:
            for index in range(len(self._buffers)):   # (enumerate's cached tuple would hold a reference)
                buf = self._buffers[index]
                if sys.getrefcount(buf) == _REFS_FREE:
                    if len(buf) >= size and (fit is None or len(buf) < len(fit)):
                        fit = buf
                    elif len(buf) < size and (spare is None or len(buf) < len(self._buffers[spare])):
                        spare = index
        if fit is None:
            fit = bytearray(-(-size // self.granule) * self.granule)
            self.allocated += 1
            if len(self._buffers) < self.keep:
                self._buffers.append(fit)
            elif spare is not None:
                self._buffers[spare] = fit
        return memoryview(fit)[:size]
