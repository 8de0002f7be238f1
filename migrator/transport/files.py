"""Checkpoint images: a recorded source stream in a file, plus an index.

::

    frames of the recorded stream: Hello, Layout, Pages/Zero/RoundEnd..., Freeze, ..., Digest
    Index frame: (offset, length, kind, round, pages) of every frame before it, MAC'd like them
    trailer (24 B): "MGRTIDX1", offset of the Index frame, its sequence number

The trailer lets a reader check the token and list an image's contents by reading two frames.
The writer works on a hidden temporary name (mode 0600: an image holds process memory) and only
a successful ``aclose`` makes it appear: Index, trailer, fsync, rename, fsync of the directory.
A writer that fails, is discarded or crashes never leaves a file under the final name, and a
file without its trailer is refused as incomplete. A reader names the file and the byte offset
of whatever is wrong.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from ..core.errors import ImageError, RemoteProtocolError, TransportError
from ..protocol import DATA_EVENTS, Connection, ConnectionClosed, Event, Hello, Index, IndexEntry, Role
from ._link import ChannelStats, Counters, Link
from ._receivers import DirectReceiver
from ._sender import Sender
from .net import FEATURES

TRAILER = struct.Struct("<8sQQ")
TRAILER_MAGIC = b"MGRTIDX1"
READ_CHUNK = 4 << 20
HELLO_PROBE = 64 << 10
INLINE_WRITE = 64 << 10   # frames up to this size are written in the trio thread (see _FileSendStream)


@contextmanager
def _image_errors(path: str) -> Iterator[None]:
    try:
        yield
    except (RemoteProtocolError, TransportError) as exc:
        raise ImageError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}") from exc


class _FileSendStream(trio.abc.SendStream):
    """Appends to a file descriptor (the writer owns the descriptor): a large frame from a worker
    thread, a small one (a control event, a few pages) right here. Copying a few KiB into the
    page cache takes microseconds, a worker's round trip two cross-CPU wake-ups (~64 us each);
    a checkpoint's frozen part is mostly such small frames (Freeze, the last pages, RoundEnd,
    Digest), written one after the other."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def send_all(self, data) -> None:
        await self.send_parts([memoryview(data)])

    async def send_parts(self, parts: list[memoryview]) -> None:
        if sum(map(len, parts)) <= INLINE_WRITE:
            _write_parts(self._fd, parts)
            await trio.lowlevel.checkpoint()
        else:
            await trio.to_thread.run_sync(_write_parts, self._fd, parts)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _FileReceiveStream(trio.abc.ReceiveStream):
    """Reads bytes [start, end) of a file descriptor from a worker thread."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd = fd
        self._pos = start
        self._end = end

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = min(max(max_bytes or 0, READ_CHUNK), self._end - self._pos)
        if size <= 0:
            await trio.lowlevel.checkpoint()
            return b""
        data = await trio.to_thread.run_sync(os.pread, self._fd, size, self._pos)
        self._pos += len(data)
        if not data:
            self._end = self._pos   # the file shrank under us: end here, the codec reports it
        return data

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_parts(fd: int, parts: list[memoryview]) -> None:
    written = os.writev(fd, parts)
    for part in parts:   # rare: finish what a short write left
        if written < len(part):
            _write_all(fd, part[written:])
        written = max(0, written - len(part))


# --- writing ---------------------------------------------------------------------------------


class FileWriter:
    """The source side of a recorded stream: ``send``/``flush`` like a Channel; ``aclose`` seals
    the image and gives it its name, ``discard`` gives up. As an async context manager it seals
    when the block ends normally and discards when it raises."""

    def __init__(self, path: str, temp: str, fd: int, conn: Connection, threads: int) -> None:
        self.path = path
        self._temp = temp
        self._fd: int | None = fd
        self._counters = Counters(1)
        self._link = Link(0, _FileSendStream(fd), conn, temp, self._counters)
        self._sender = Sender([self._link], self._counters, threads=threads, on_written=self._record)
        self._entries: list[IndexEntry] = []
        self._offset = 0
        self.sealed = False

    def _record(self, event: Event, length: int) -> None:
        self._entries.append(
            IndexEntry(
                offset=self._offset, length=length, kind=type(event).__name__,
                round=getattr(event, "round", 0), pages=event.pages if type(event) in DATA_EVENTS else 0,
            )
        )
        self._offset += length

    @property
    def entries(self) -> tuple[IndexEntry, ...]:
        return tuple(self._entries)

    def statistics(self) -> ChannelStats:
        return self._counters.freeze()

    async def send(self, event: Event) -> None:
        self._check_open()
        with _image_errors(self._temp):
            await self._sender.send(event)

    async def flush(self) -> None:
        self._check_open()
        with _image_errors(self._temp):
            await self._sender.flush()

    async def aclose(self) -> None:
        """Seal the image (Index, trailer, fsync) and give it its final name, atomically. If the
        stream failed earlier, or sealing fails, the image is discarded and ImageError raised."""
        if self._fd is None:
            return
        try:
            if self._link.broken is not None or self._link.conn.state.name == "ERROR":
                raise ImageError(f"{self.path}: the stream failed earlier; the image is not sealed")
            with _image_errors(self._temp):
                await self._sender.flush()
                index_offset, index_seq = self._offset, len(self._entries)
                await self._sender.send(Index(entries=tuple(self._entries)))
                trailer = TRAILER.pack(TRAILER_MAGIC, index_offset, index_seq)
                await trio.to_thread.run_sync(self._seal, trailer)
            self.sealed = True
        except BaseException:
            self.discard()
            raise

    def _seal(self, trailer: bytes) -> None:
        """Worker thread: the trailer, fsync, then the name (the directory fsync'd after it)."""
        _write_all(self._fd, trailer)
        os.fsync(self._fd)
        fd, self._fd = self._fd, None
        os.close(fd)
        os.rename(self._temp, self.path)
        directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def discard(self) -> None:
        """Give up: close and delete the temporary file (nothing ever had the final name)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass

    async def __aenter__(self) -> FileWriter:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.aclose()
        else:
            self.discard()

    def _check_open(self) -> None:
        if self._fd is None:
            raise ImageError(f"{self.path}: the image writer is closed")


async def open_file_writer(path: str, *, token: bytes | None, compress: str = "zstd:1", threads: int = 1) -> FileWriter:
    """Start recording a checkpoint image to ``path`` (role SOURCE, no peer).

    ``threads`` compress in parallel (frames stay in order). Nothing appears at ``path`` until
    ``aclose`` seals it.
    """
    conn = Connection(Role.SOURCE, token=token, compress=compress, recorded=True)
    directory, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    with _image_errors(path):
        fd = await trio.to_thread.run_sync(os.open, temp, flags, 0o600)
    writer = FileWriter(path, temp, fd, conn, threads)
    try:
        await writer.send(Hello(features=FEATURES))
    except BaseException:
        writer.discard()
        raise
    return writer


# --- reading ---------------------------------------------------------------------------------


class FileReader:
    """The destination side of a recorded stream: ``receive`` events until ``trio.EndOfChannel``
    (or ``async for``). ``hello`` and ``entries`` are known from the index before any page is
    read."""

    def __init__(self, path: str, fd: int, data_end: int, hello: Hello, index: Index, conn: Connection) -> None:
        self.path = path
        self.hello = hello
        self.entries: tuple[IndexEntry, ...] = index.entries
        self._fd: int | None = fd
        self._counters = Counters(1)
        link = Link(0, _FileReceiveStream(fd, 0, data_end), conn, path, self._counters)
        self._receiver = DirectReceiver(link, self._counters)
        self._index = index
        self._ended = False

    def statistics(self) -> ChannelStats:
        return self._counters.freeze()

    async def receive(self) -> Event:
        """The next event of the image; ``trio.EndOfChannel`` after the last one."""
        if self._fd is None:
            raise ImageError(f"{self.path}: the image reader is closed")
        if self._ended:
            raise trio.EndOfChannel
        with _image_errors(self.path):
            event = await self._receiver.receive()
            if type(event) is Hello:    # known already (self.hello); like a Channel's handshake
                event = await self._receiver.receive()
        if type(event) is Index:
            if event != self._index:
                raise ImageError(f"{self.path}: the index read in sequence differs from the one the trailer points to")
            self._ended = True
            raise trio.EndOfChannel
        if type(event) is ConnectionClosed:
            self._ended = True
            raise trio.EndOfChannel
        return event

    def __aiter__(self) -> FileReader:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> FileReader:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


async def open_file_reader(path: str, *, token: bytes | None) -> FileReader:
    """Open a committed image: checks the trailer, the token (against the first frame) and the
    index; raises ImageError naming the file and offset when any of them is wrong."""
    with _image_errors(path):
        fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _image_errors(path):
            hello, index, data_end = await trio.to_thread.run_sync(_read_index, path, fd, token)
        conn = Connection(Role.DEST, token=token, recorded=True, defer_payloads=True)
        return FileReader(path, fd, data_end, hello, index, conn)
    except BaseException:
        os.close(fd)
        raise


def _read_index(path: str, fd: int, token: bytes | None) -> tuple[Hello, Index, int]:
    """Worker thread: the image's Hello and Index, and where its frames end (the trailer)."""
    size = os.fstat(fd).st_size
    end = size - TRAILER.size
    incomplete = "truncated, or its writer did not finish"
    if end <= 0:
        raise ImageError(f"{path}: incomplete image: {size} bytes at offset 0, no index ({incomplete})")
    magic, index_offset, index_seq = TRAILER.unpack(os.pread(fd, TRAILER.size, end))
    if magic != TRAILER_MAGIC:
        raise ImageError(f"{path}: incomplete image: no index trailer at offset {end} ({incomplete})")
    if not 0 < index_offset < end:
        raise ImageError(f"{path}: trailer at offset {end} points to an index at {index_offset}, outside the image")
    probe = Connection(Role.DEST, token=token, recorded=True)
    probe.receive_data(os.pread(fd, min(HELLO_PROBE, index_offset), 0))
    hello = probe.next_event()
    if type(hello) is not Hello:
        raise ImageError(f"{path}: no complete Hello frame at offset 0")
    probe.skip_to(index_seq, index_offset)
    probe.receive_data(os.pread(fd, end - index_offset, index_offset))
    probe.receive_data(b"")
    index = probe.next_event()
    if type(index) is not Index or type(probe.next_event()) is not ConnectionClosed:
        raise ImageError(f"{path}: no complete Index frame at offset {index_offset}")
    return hello, index, end
