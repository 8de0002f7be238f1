"""A frame whose payload is received straight into memory the transport names (``place_frame``).

A raw Pages payload is the pages of its runs in order, so a receiver that maps the memory the
pages belong to can receive each run's bytes into its final place: no buffer, no copy after the
socket's. The frame is split in three: header and meta (already buffered when the frame is
placed), the payload views, and a small buffer for the tags after the payload. Bytes of the
frame buffered beyond the meta are copied into place first; the rest is filled by the
transport, in order, and reported with ``filled``.
"""

from __future__ import annotations

from collections.abc import Sequence


class PlacedFrame:
    def __init__(self, head: bytes, payload: Sequence[memoryview], tail_len: int, owner: object) -> None:
        self.head = head                       # header and meta
        self.payload = tuple(payload)
        self.tail = bytearray(tail_len)        # payload tag, frame tag
        self.owner = owner
        self._parts = [*self.payload, memoryview(self.tail)]
        self._size = sum(part.nbytes for part in self._parts)
        self._filled = 0

    @property
    def complete(self) -> bool:
        return self._filled == self._size

    @property
    def missing(self) -> int:
        return self._size - self._filled

    def copy_in(self, data) -> None:
        """Bytes of the frame that were buffered before it was placed (the next ones, in order)."""
        data = memoryview(data).cast("B")
        while data.nbytes:
            view = self.unfilled()[0]
            n = min(view.nbytes, data.nbytes)
            view[:n] = data[:n]
            self.filled(n)
            data = data[n:]

    def unfilled(self) -> list[memoryview]:
        """The views still to fill, in order."""
        skip, views = self._filled, []
        for part in self._parts:
            if skip >= part.nbytes:
                skip -= part.nbytes
                continue
            views.append(part[skip:])
            skip = 0
        return views

    def filled(self, nbytes: int) -> None:
        self._filled += nbytes
