"""A frame whose payload is received straight into memory the transport names (``place_frame``).

A raw Pages payload is the pages of its runs in order, so a receiver that maps the memory the
pages belong to can receive each run's bytes into its final place: no buffer, no copy after the
socket's. The frame is split in three: header and meta (already buffered when the frame is
placed), the payload views, and a small buffer for the tags after the payload. Bytes of the
frame buffered beyond the meta are copied into place first; the rest is filled by the
transport, in order, and reported with ``filled``.

A payload part is a writable byte view, or a target the transport fills itself (``Target``:
a native receive over a scattered batch's thousand places, where a view per place cost more in
Python than the copy it spared). Nothing here reads a target's bytes, so only sessions whose
payloads carry no tag may use one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Target(Protocol):
    """Where a payload lands that the transport fills itself: ``nbytes`` of it, and
    ``copy_in(offset, data)`` for bytes of the frame read before it was placed."""

    nbytes: int

    def copy_in(self, offset: int, data: memoryview) -> None: ...


def is_target(part: object) -> bool:
    """Whether a payload part is a ``Target`` rather than a byte buffer: one attribute lookup
    (a runtime-checkable Protocol's isinstance, on every part of every placed frame, cost more
    than the rest of the part's bookkeeping)."""
    return hasattr(part, "copy_in")


class PlacedFrame:
    def __init__(self, head: bytes, payload: Sequence[memoryview | Target], tail_len: int, owner: object) -> None:
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
            part = self.unfilled()[0]
            if type(part) is tuple:
                target, offset = part
                n = min(target.nbytes - offset, data.nbytes)
                target.copy_in(offset, data[:n])
            else:
                n = min(part.nbytes, data.nbytes)
                part[:n] = data[:n]
            self.filled(n)
            data = data[n:]

    def unfilled(self) -> list[memoryview | tuple[Target, int]]:
        """The parts still to fill, in order: views, and a target as (target, its first byte
        still to fill)."""
        skip, parts = self._filled, []
        for part in self._parts:
            if skip >= part.nbytes:
                skip -= part.nbytes
                continue
            parts.append(part[skip:] if type(part) is memoryview else (part, skip))
            skip = 0
        return parts

    def filled(self, nbytes: int) -> None:
        self._filled += nbytes
