"""The receive buffer: chunks as they came, so a frame costs at most one copy, or none.

Appending to one bytearray and slicing frames out of it copies every payload twice. Here a
frame that lies inside one received chunk is handed out as a view of it (no copy), and one
that spans chunks is joined once. A transport that can read straight into memory avoids even
that: ``adopt`` moves what is buffered of a large frame to the front of the transport's buffer,
which is then filled in place (``filled``) and handed out as views, never copied.
"""

from __future__ import annotations

from collections import deque


class ReceiveBuffer:
    def __init__(self) -> None:
        self._chunks: deque[bytes | memoryview] = deque()
        self._start = 0          # bytes of the first chunk already taken
        self._size = 0
        self._unfilled = 0       # bytes at the end of the last (adopted) chunk not written yet

    def __len__(self) -> int:
        return self._size

    @property
    def unfilled(self) -> int:
        """Bytes of the adopted buffer still to be written (0: none is being filled)."""
        return self._unfilled

    def append(self, data) -> None:
        assert not self._unfilled, "append while an adopted buffer is filling"
        chunk = data if type(data) is bytes else bytes(data)   # the caller may reuse its buffer
        self._chunks.append(chunk)
        self._size += len(chunk)

    def adopt(self, buffer: memoryview) -> memoryview:
        """Continue in ``buffer`` (writable, at least ``len(self)`` bytes, kept without copying):
        what is buffered moves to its front; returns the rest, to be written and reported with
        ``filled``."""
        assert not self._unfilled, "adopt while an adopted buffer is filling"
        size, pos, start = self._size, 0, self._start
        for chunk in self._chunks:
            piece = memoryview(chunk)[start:]
            buffer[pos : pos + len(piece)] = piece
            pos += len(piece)
            start = 0
        self._chunks.clear()
        self._chunks.append(buffer)
        self._start = 0
        self._unfilled = len(buffer) - size
        return buffer[size:]

    def filled(self, nbytes: int) -> None:
        """``nbytes`` more bytes of the adopted buffer were written (in order, after the last)."""
        assert 0 <= nbytes <= self._unfilled, "filled beyond the adopted buffer"
        self._unfilled -= nbytes
        self._size += nbytes

    def clear(self) -> None:
        self._chunks.clear()
        self._start = self._size = self._unfilled = 0

    def peek(self, size: int) -> bytes:
        """The first ``size`` bytes (at most what is buffered), left in place."""
        first = self._chunks[0] if self._chunks else b""
        if len(first) - self._start >= size:
            return bytes(first[self._start : self._start + size])
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
