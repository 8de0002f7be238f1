"""The receive buffer: chunks as they came, so a frame costs at most one copy.

Appending to one bytearray and slicing frames out of it copies every payload twice. Here a
frame that lies inside one received chunk is handed out as a view of it (no copy), and one
that spans chunks is joined once.
"""

from __future__ import annotations

from collections import deque


class ReceiveBuffer:
    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._start = 0          # bytes of the first chunk already taken
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data) -> None:
        chunk = data if type(data) is bytes else bytes(data)   # the caller may reuse its buffer
        self._chunks.append(chunk)
        self._size += len(chunk)

    def clear(self) -> None:
        self._chunks.clear()
        self._start = self._size = 0

    def peek(self, size: int) -> bytes:
        """The first ``size`` bytes (at most what is buffered), left in place."""
        first = self._chunks[0] if self._chunks else b""
        if len(first) - self._start >= size:
            return first[self._start : self._start + size]
        return bytes(self._gather(size, consume=False))

    def take(self, size: int) -> memoryview:
        """Remove and return the first ``size`` bytes (``size`` <= len(self))."""
        first = self._chunks[0]
        if len(first) - self._start >= size:
            view = memoryview(first)[self._start : self._start + size]
            self._start += size
            if self._start == len(first):
                self._chunks.popleft()
                self._start = 0
            self._size -= size
            return view
        return memoryview(self._gather(size, consume=True))

    def _gather(self, size: int, *, consume: bool) -> bytes:
        parts, need, start = [], size, self._start
        for chunk in self._chunks:
            piece = memoryview(chunk)[start : start + need]
            parts.append(piece)
            need -= len(piece)
            start = 0
            if not need:
                break
        joined = b"".join(parts)
        if consume:
            need, start = len(joined), self._start
            while need:
                left = len(self._chunks[0]) - start
                if left <= need:
                    self._chunks.popleft()
                    need -= left
                    start = 0
                else:
                    start += need
                    need = 0
            self._start = start
            self._size -= len(joined)
        return joined
