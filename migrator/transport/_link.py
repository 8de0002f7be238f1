"""One byte stream and the Connection that frames it; shared counters of a channel."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ..errors import RemoteProtocolError, TransportError
from ..protocol import NEED_DATA, Connection, ConnectionClosed, Event, PendingPages

READ_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """What a channel moved so far. ``bytes_raw``/``bytes_wire`` count what was sent: page bytes
    before compression, and every frame byte written (headers, metadata, tags)."""

    streams: int
    bytes_raw: int
    bytes_wire: int
    frames_sent: int
    frames_received: int
    bytes_raw_received: int
    bytes_wire_received: int
    compress_seconds: float      # summed over worker threads
    decompress_seconds: float    # summed over worker threads
    throttle_seconds: float      # waited for the bandwidth cap

    @property
    def ratio(self) -> float:
        """Raw page bytes per wire byte sent (above 1 when compression pays)."""
        return self.bytes_raw / self.bytes_wire if self.bytes_wire else 0.0


class Counters:
    """Mutable tallies behind ``ChannelStats`` (touched only from the trio thread)."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.bytes_raw = 0
        self.bytes_wire = 0
        self.frames_sent = 0
        self.frames_received = 0
        self.bytes_raw_received = 0
        self.bytes_wire_received = 0
        self.compress_seconds = 0.0
        self.decompress_seconds = 0.0
        self.throttle_seconds = 0.0

    def freeze(self) -> ChannelStats:
        return ChannelStats(**vars(self))

    def absorb(self, other: Counters) -> None:
        """Add what ``other`` counted (a parallel stream's handshake, before it joined)."""
        for name, value in vars(other).items():
            if name != "streams":
                setattr(self, name, getattr(self, name) + value)


_LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Link:
    def __init__(self, index: int, stream: trio.abc.Stream, conn: Connection, name: str, counters: Counters) -> None:
        self.index = index
        self.stream = stream
        self.conn = conn
        self.name = name
        self.counters = counters
        self.broken: TransportError | None = None

    async def read(self) -> Event | PendingPages:
        """The next event from this stream. Raises RemoteProtocolError for bad data and
        TransportError when the stream fails or ends where the protocol does not allow it; a
        clean end is returned as ConnectionClosed."""
        conn = self.conn
        while True:
            state = conn.state
            try:
                event = conn.next_event()
            except RemoteProtocolError:
                # A failed write puts the connection in ERROR; say why, not "failed earlier".
                if self.broken is not None:
                    raise self.broken from None
                raise
            if event is NEED_DATA:
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except _LOST as exc:
                    raise TransportError(f"{self.name}: read failed ({_why(exc)})") from exc
                self.counters.bytes_wire_received += len(data)
                conn.receive_data(data)
                continue
            if type(event) is ConnectionClosed:
                if not event.expected:
                    raise TransportError(f"{self.name}: the peer closed the connection in state {state.value}")
            else:
                self.counters.frames_received += 1
            return event

    async def write(self, frame) -> None:
        """Write one frame: bytes, or the parts ``PendingFrame.finish_parts`` returns."""
        if self.broken is not None:
            raise self.broken
        parts = (frame,) if isinstance(frame, (bytes, bytearray, memoryview)) else frame
        try:
            size = await send_parts(self.stream, parts)
            self.counters.bytes_wire += size
            self.counters.frames_sent += 1
        except _LOST as exc:
            self._break(TransportError(f"{self.name}: write failed ({_why(exc)})"))
            raise self.broken from exc
        except trio.Cancelled:
            self._break(TransportError(f"{self.name}: a cancelled send left the stream mid-frame"))
            raise

    def _break(self, error: TransportError) -> None:
        self.broken = error
        self.conn.send_failed()

    async def aclose(self) -> None:
        if self.broken is not None:
            await trio.aclose_forcefully(self.stream)
        else:
            await _quiet_close(self.stream)


async def send_parts(stream: trio.abc.SendStream, parts) -> int:
    """Write buffers in order without joining them: one ``sendmsg`` (gather write) per try on a
    socket, the stream's own ``send_parts`` if it has one, else one joined ``send_all``."""
    views = [view for view in map(memoryview, parts) if view.nbytes]
    size = sum(view.nbytes for view in views)
    if isinstance(stream, trio.SocketStream):
        views = [view.cast("B") for view in views]
        while views:
            sent = await stream.socket.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if sent:
                views[0] = views[0][sent:]
    elif hasattr(stream, "send_parts"):
        await stream.send_parts(views)
    else:
        await stream.send_all(views[0] if len(views) == 1 else b"".join(views))
    return size


async def _quiet_close(stream: trio.abc.AsyncResource) -> None:
    try:
        await stream.aclose()
    except _LOST:
        pass


def _why(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc) or type(exc).__name__
