"""Image stream files: the recorded migration stream written and read through the sans-IO codec.

PROVISIONAL: the stream package's own file transport (``migrator.transport.open_file_writer`` /
``open_file_reader``) did not exist yet when this was written; this module is the one place that
would switch to it. It keeps the same contract: frames plus an Index, written atomically
(temporary name, fsync, rename on a successful ``aclose``; a crashed writer leaves no file under
the final name), and a reader that names the file and byte offset of any defect.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass

import trio

from ..errors import ImageError, ProtocolError
from ..protocol import NEED_DATA, Connection, ConnectionClosed, Event, Hello, Index, IndexEntry, Role

READ_SIZE = 1 << 20
_local = threading.local()


def _compressor(pending):
    """The calling thread's own compressor (python-zstandard objects are not thread-safe)."""
    if pending.compression.level is None:
        return None
    key = ("c", pending.compression.level)
    c = getattr(_local, "compressors", None)
    if c is None:
        c = _local.compressors = {}
    if key not in c:
        c[key] = pending.compression.compressor()
    return c[key]


@dataclass(frozen=True)
class WriterStats:
    bytes_raw: int
    bytes_wire: int
    frames_sent: int
    compress_seconds: float


class ImageWriter:
    """``send``/``flush``/``aclose``/``statistics`` like a source Channel, into one file."""

    def __init__(self, path: str, *, token: bytes | None, compress: str) -> None:
        self.path = os.path.abspath(path)
        self._conn = Connection(Role.SOURCE, token=token, compress=compress, recorded=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                         dir=os.path.dirname(self.path))
        self._file = os.fdopen(fd, "wb")
        self._entries: list[IndexEntry] = []
        self._offset = 0
        self._raw = 0
        self._compress_s = 0.0
        self._closed = False
        self._lock = trio.Lock()

    def _write(self, pending, event) -> None:
        """Worker thread: compress, frame and append one event."""
        t = time.perf_counter()
        data = pending.finish(_compressor(pending))
        self._compress_s += time.perf_counter() - t
        self._file.write(data)
        self._entries.append(IndexEntry(offset=self._offset, length=len(data), kind=pending.kind.__name__,
                                        round=getattr(event, "round", 0), pages=getattr(event, "pages", 0)))
        self._offset += len(data)
        self._raw += pending.raw_len

    async def send(self, event: Event) -> None:
        async with self._lock:
            if self._closed:
                raise ImageError(f"{self.path}: the image writer is closed")
            pending = self._conn.send_deferred(event)
            if pending.needs_thread:
                await trio.to_thread.run_sync(self._write, pending, event)
            else:
                self._write(pending, event)

    async def flush(self) -> None:
        """Frames are written as they are sent; nothing waits here."""

    async def receive(self) -> Event:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def statistics(self) -> WriterStats:
        return WriterStats(self._raw, self._offset, len(self._entries), self._compress_s)

    async def aclose(self) -> None:
        """Seal: write the Index, fsync, rename into place. Called after a failure (or when
        cancelled) it removes the temporary file instead: no half image ever has the name."""
        if self._closed:
            return
        async with self._lock:
            self._closed = True
            try:
                if self._conn.state.name in ("ERROR", "START"):
                    raise ImageError(f"{self.path}: the stream failed; not sealed")
                self._write(self._conn.send_deferred(Index(entries=tuple(self._entries))), None)
                await trio.to_thread.run_sync(self._seal)
            except BaseException:
                self.discard()
                raise

    def discard(self) -> None:
        """Give up: close and remove the temporary file (nothing ever had the final name)."""
        self._closed = True
        self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)

    def _seal(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)


async def open_image_writer(path: str, *, token: bytes | None, compress: str) -> ImageWriter:
    writer = ImageWriter(path, token=token, compress=compress)
    await writer.send(Hello())
    return writer


class ImageReader:
    """``receive()`` the events of one image file: Layout … Digest, then the Index, then None."""

    def __init__(self, path: str, *, token: bytes | None) -> None:
        self.path = os.path.abspath(path)
        self._conn = Connection(Role.DEST, token=token, recorded=True)
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise ImageError(f"{self.path}: cannot open: {exc.strerror}") from exc
        self._eof = False
        self.size = os.fstat(self._file.fileno()).st_size

    def _next(self):
        while True:
            try:
                event = self._conn.next_event()
            except ProtocolError as exc:
                raise ImageError(f"{self.path}: {exc}") from None
            if event is NEED_DATA:
                data = self._file.read(READ_SIZE)
                self._conn.receive_data(data)
                continue
            if type(event) is Hello:
                continue
            if type(event) is ConnectionClosed:
                if not event.expected:
                    raise ImageError(f"{self.path}: truncated at offset {self.size}: the stream ends before its Index")
                return None
            return event

    async def receive(self) -> Event | None:
        """The next event (the Index last); None at the end of a sealed stream. ImageError names
        the file and offset of a truncated or corrupted frame."""
        return await trio.to_thread.run_sync(self._next)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_image_reader(path: str, *, token: bytes | None) -> ImageReader:
    return ImageReader(path, token=token)
