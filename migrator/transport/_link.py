"""One byte stream and the Connection that frames it; shared counters of a channel.

Reading a socket, a large frame (a Pages batch) is received straight into one buffer of its
size (``Connection.gather_frame`` and ``recv_into``), so its payload is never joined or copied
in Python; buffers come from a pool and are reused once the consumer has let go of the payload
(fresh memory costs page faults, up to ~2 s per GiB on this VM). After such a frame the link
reads little at a time (``LOOKAHEAD``), so that the next frame's header arrives before much of
its payload does; small frames are read in bulk (``READ_SIZE``) as before.

A link given a ``placer`` (the destination, when the restore guest's memory is mapped here) does
better for a raw Pages frame: once the frame's meta is in, the placer names where each run's
bytes belong, and the payload is received there, with no buffer and no copy after the
socket's: on a plain socket whose payloads carry no tag by one C call per receive over all its
runs' places (the placer's ``receive``, however scattered the batch), elsewhere with
``recvmsg_into`` over views of them.

A TLS link (``TLSStream``) gathers the same way, its ``receive_into`` decrypting into the
frame's buffer, and writes a frame's parts with one ``send_parts``; its TCP socket is tuned all
the same. Other streams (in memory, tests) read with ``receive_some``, a large frame to its end
before the Connection parses again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
from dataclasses import dataclass

import trio

from ..core.buffers import SizedBufferPool
from ..core.errors import RemoteProtocolError, TransportError
from ..protocol import NEED_DATA, Connection, ConnectionClosed, Event, PendingPages
from ._tls_stream import TLSStream

READ_SIZE = 1 << 20
PLACE_IOV_MAX = 64       # views per recvmsg_into (the kernel's IOV_MAX is 1024)
GATHER_MIN = 128 << 10   # frames at least this large are received into a buffer of their own
LOOKAHEAD = 4 << 10      # read after a gathered frame: the next header, not the next payload
WARM_BUFFER_BYTES = (4 << 20) + (64 << 10)   # a warmed receive buffer: a 4 MiB Pages frame, its header
                                             # and LOOKAHEAD (the largest batch a source sends)
NOTSENT_LOWAT = 4 << 20  # unsent bytes the kernel may hold for a TCP link (see _tune_tcp)
LOOPBACK_CONGESTION = b"reno"   # allowed to unprivileged users by default (tcp_allowed_congestion_control)
# A peer that vanishes without a FIN or RST (a host that died, a cut cable) is noticed within
# KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL seconds while the link is idle, and
# within USER_TIMEOUT_MS while data waits unacknowledged, instead of the kernel's ~2 h / ~15 min.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 10, 5, 3
USER_TIMEOUT_MS = 30_000


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
    frames_gathered: int         # received straight into a buffer of their own (sockets)
    frames_placed: int           # received straight into their pages' places
    receive_buffers: int         # buffers allocated for them (the rest were reused)

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
        self.frames_gathered = 0
        self.frames_placed = 0
        self.receive_buffers = 0

    def freeze(self) -> ChannelStats:
        return ChannelStats(**vars(self))

    def absorb(self, other: Counters) -> None:
        """Add what ``other`` counted (a parallel stream's handshake, before it joined)."""
        for name, value in vars(other).items():
            if name != "streams":
                setattr(self, name, getattr(self, name) + value)


_LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Link:
    """``pool``: where gathered frames are received (default: a pool of this link's own); a
    receiver shares one, warmed ahead, between its links.

    ``placer``: None, or called with the ``IncomingPages`` of each large raw Pages frame and
    whether this link can receive natively; it returns None (receive the frame as usual) or a
    placement whose ``payload`` (writable byte views, or itself as a target with ``receive``)
    the payload fills in order. The frame is then delivered as ``PlacedPages`` owned by it."""

    def __init__(self, index: int, stream: trio.abc.Stream, conn: Connection, name: str, counters: Counters, *,
                 pool: SizedBufferPool | None = None) -> None:
        self.index = index
        self.stream = stream
        self.conn = conn
        self.name = name
        self.counters = counters
        self.broken: TransportError | None = None
        self.placer = None
        self._recv_into = None      # for gathering large frames: sockets and TLS
        self._recv_views = None     # for placing them: into several views at once
        self._fd = None             # for placing them natively: a plain socket
        if isinstance(stream, trio.SocketStream):
            self._fd = stream.socket.fileno()
            self._recv_into = stream.socket.recv_into
            self._recv_views = _socket_views_reader(stream.socket)
            _tune_tcp(stream.socket)
        elif isinstance(stream, TLSStream):
            self._recv_into = stream.receive_into
            self._recv_views = lambda views: stream.receive_into(views[0])
            if isinstance(stream.transport_stream, trio.SocketStream):
                _tune_tcp(stream.transport_stream.socket)
        self._pool = (pool or SizedBufferPool()) if self._recv_into is not None else None
        self._read_size = READ_SIZE

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
                    await self._receive()
                except _LOST as exc:
                    raise TransportError(f"{self.name}: read failed ({_why(exc)})") from exc
                continue
            if type(event) is ConnectionClosed:
                if not event.expected:
                    raise TransportError(f"{self.name}: the peer closed the connection in state {state.value}")
            else:
                self.counters.frames_received += 1
            return event

    async def _receive(self) -> None:
        """Feed the Connection what it waits for: a whole large frame, or some bytes."""
        size = self.conn.incomplete_frame()
        if size >= GATHER_MIN and self._recv_into is not None:
            if self.placer is None or not await self._place():
                await self._gather(size)
            self._read_size = LOOKAHEAD
            return
        if size:
            self._read_size = READ_SIZE
        # A large frame on another stream is read to its end here, not one next_event per chunk.
        conn, counters, stream = self.conn, self.counters, self.stream
        while True:
            data = await stream.receive_some(self._read_size)
            counters.bytes_wire_received += len(data)
            conn.receive_data(data)
            if size < GATHER_MIN or not data or not conn.incomplete_frame():
                return

    async def _gather(self, size: int) -> None:
        """Receive the rest of a ``size``-byte frame into one pooled buffer; bytes read past
        its end (at most LOOKAHEAD) are fed to the Connection as the next ones."""
        conn, pool, counters = self.conn, self._pool, self.counters
        allocated = pool.allocated
        space = pool.take(size + LOOKAHEAD)
        counters.receive_buffers += pool.allocated - allocated
        counters.frames_gathered += 1
        end = size - len(conn.gather_frame(space[:size]))
        while end < size:
            n = await self._recv_into(space[end:])
            counters.bytes_wire_received += n
            if not n:
                conn.receive_data(b"")      # the peer ended mid-frame: next_event says so
                return
            conn.gathered(min(n, size - end))
            end += n
        if end > size:
            conn.receive_data(bytes(space[size:end]))

    async def _place(self) -> bool:
        """Receive the incomplete frame into its pages' places, if the placer takes it; False
        to receive it as usual. Its header and meta are read first (exactly those bytes), so
        that the runs are known and checked before any payload byte is read."""
        conn, counters = self.conn, self.counters
        while missing := conn.frame_head_missing():
            head = bytearray(missing)
            n = await self._recv_into(head)
            counters.bytes_wire_received += n
            conn.receive_data(bytes(head[:n]))    # b"" at the peer's end: next_event says so
            if not n:
                return True
        incoming = conn.incoming_pages()
        native = self._fd is not None and conn.untagged
        placement = self.placer(incoming, native) if incoming is not None else None
        if placement is None:
            return False
        parts = conn.place_frame(placement.payload, placement)
        counters.frames_placed += 1
        while parts:
            if type(parts[0]) is tuple:          # a target: received by C from its first byte missing
                n = await self._recv_target(*parts[0])
            else:
                n = await self._recv_views(parts[:PLACE_IOV_MAX])
            counters.bytes_wire_received += n
            if not n:
                conn.receive_data(b"")
                return True
            conn.gathered(n)
            _consume(parts, n)
        return True

    async def _recv_target(self, target, offset: int) -> int:
        """One receive into a native placement (``target.receive``), waiting for the socket as
        trio's own socket methods do."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while (n := target.receive(self._fd, offset)) is None:
            await trio.lowlevel.wait_readable(self._fd)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return n

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


def _consume(parts: list, n: int) -> None:
    """Drop ``n`` received bytes from the front of a placed frame's parts (views, and a target
    as (target, first byte missing))."""
    while n:
        part = parts[0]
        if type(part) is tuple:
            target, offset = part
            if n >= target.nbytes - offset:
                n -= target.nbytes - offset
                parts.pop(0)
            else:
                parts[0], n = (target, offset + n), 0
        elif n >= part.nbytes:
            n -= parts.pop(0).nbytes
        else:
            parts[0], n = part[n:], 0


def plain_socket(stream: trio.abc.Stream) -> bool:
    """A socket post-copy's native fault loops can read and write themselves (not TLS, not in
    memory): what an end's ``NATIVE_FAULTS`` feature says of its urgent stream."""
    return isinstance(stream, trio.SocketStream)


async def send_parts(stream: trio.abc.SendStream, parts) -> int:
    """Write buffers in order without joining them: one ``sendmsg`` (gather write) per try on a
    socket, the stream's own ``send_parts`` if it has one (TLS), else one joined ``send_all``."""
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


def _socket_views_reader(sock):
    async def receive(views) -> int:
        return (await sock.recvmsg_into(views))[0]
    return receive


def _tune_tcp(sock) -> None:
    """Socket options for bulk transfer, each best effort (none needs privileges).

    * TCP_NOTSENT_LOWAT: let the kernel queue up to the send buffer instead of the 16 KiB of
      unsent bytes trio's SocketStream allows (set there for latency). With BBR pacing the
      unsent bytes pile up, and every megabyte frame took ~7 partial ``sendmsg`` calls, each a
      trip through the event loop. The Sender bounds what it queues itself.
    * TCP_CONGESTION "reno" when the peer is on this host (a loopback address): there is no
      network to pace for, and BBR's pacing timers (the usual default) cost more CPU than the
      copy itself: raw sendall of 1 GiB over loopback takes ~0.2 s with bbr, ~0.14 s with reno.
    * Keepalive probes and TCP_USER_TIMEOUT (see KEEPALIVE_IDLE): a dead peer fails the
      migration within half a minute, and the source guest resumes.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    with contextlib.suppress(OSError, AttributeError, ValueError):
        if _is_loopback(sock.getpeername()[0]):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, LOOPBACK_CONGESTION)


def _is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


async def _quiet_close(stream: trio.abc.AsyncResource) -> None:
    try:
        await stream.aclose()
    except _LOST:
        pass


def _why(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        return str(exc)          # TLSStream's "TLS: <OpenSSL's reason>"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc) or type(exc).__name__
