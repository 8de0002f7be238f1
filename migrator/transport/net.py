"""TCP and unix-socket sessions: ``connect`` (source), ``serve`` (destination), and the
stream-level halves they are made of (``open_source``, ``Acceptor``), usable over any trio stream.

With ``streams=N`` the source opens N connections: the first runs the handshake, the others join
its session (authenticated with the session's secret, not the token) and carry pages only.

With ``tls`` (an ``ssl.SSLContext``, see ``tls.py``) every TCP connection is wrapped in a
``TLSStream`` and its TLS handshake runs first, inside the handshake timeout; the token
handshake and frame MACs run on top unchanged.

``serve`` accepts through ``_gate``: connections still in their handshake are capped in all and
per peer (``HandshakeLimits``), and a full file table pauses accepting instead of failing it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Sequence

import trio

from ..core.errors import MigratorError, RemoteProtocolError, TransportError
from ..core.failures import leaf_exceptions
from ..core.heap import release_free_memory, use_main_arena_only
from ..protocol import CHECKSUM_FRAMES, NATIVE_FAULTS, POSTCOPY_FEATURE, POSTCOPY_SESSION, PROTOCOL_VERSION, URGENT_STREAM, ZERO_PAGES, Auth, Connection, Hello, Role
from ._address import Address, parse_address
from ._gate import Burst, HandshakeGate, HandshakeLimits, Pending, accept_connections
from ..core.buffers import SizedBufferPool
from ._link import WARM_BUFFER_BYTES, Counters, Link, plain_socket
from ._tls_stream import TLSStream
from .channel import Channel
from .tls import check_tls_address
from .tls import handshake as tls_handshake

HANDSHAKE_TIMEOUT_S = 10.0
FEATURES = ("zstd", "streams", ZERO_PAGES, POSTCOPY_FEATURE)


def link_features(stream: trio.abc.Stream, *, frame_macs: bool = False) -> tuple[str, ...]:
    """What this end says in its Hello over ``stream``: FEATURES, and CHECKSUM_FRAMES when the
    link needs no per-frame MAC (``needs_no_mac``) and ``frame_macs`` does not insist on them
    (a relay that carries a loopback connection over a network in clear looks like loopback)."""
    if frame_macs:
        return FEATURES
    if isinstance(stream, TLSStream):
        return (*FEATURES, CHECKSUM_FRAMES)
    sock = getattr(stream, "socket", None)
    try:
        protected = sock is not None and needs_no_mac(sock.family, sock.getsockname(), sock.getpeername())
    except OSError:
        protected = False
    return (*FEATURES, CHECKSUM_FRAMES) if protected else FEATURES


def needs_no_mac(family: int, local, peer) -> bool:
    """A unix socket, or TCP between two loopback addresses: nobody but root can write into
    it (and root can read the guest anyway). TLS protects a link too (``link_features``);
    anything else, another host above all, keeps the MACs."""
    if family == socket.AF_UNIX:
        return True
    if family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        return all(ipaddress.ip_address(end[0].split("%", 1)[0]).is_loopback for end in (local, peer))
    except ValueError:
        return False
MAX_STREAMS = 64

log = logging.getLogger("migrator.transport")

Handler = Callable[[Channel], Awaitable[None]]


# --- source ----------------------------------------------------------------------------------


async def connect(
    address: str,
    *,
    token: bytes | None,
    compress: str = "zstd:1",
    streams: int = 1,
    bandwidth: float | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    tls: ssl.SSLContext | None = None,
    frame_macs: bool = False,
    urgent: bool = False,
) -> Channel:
    """Open a session to ``address`` ("HOST:PORT", "tcp:HOST:PORT", "unix:/path") as the source.

    ``streams`` connections (and as many compression threads); ``bandwidth`` caps wire bytes/s;
    ``tls`` (a client context) encrypts every connection, the server's certificate checked
    against the address's host; ``frame_macs`` keeps MACs on every frame however protected the
    link looks (``link_features``); ``urgent`` opens one connection more, kept for urgent data
    (``Channel.send(..., urgent=True)``: post-copy's requested pages).
    """
    target = parse_address(address)
    if type(streams) is not int or not 1 <= streams <= MAX_STREAMS - urgent:
        raise TransportError(f"streams must be 1..{MAX_STREAMS - urgent}, not {streams!r}")
    check_tls_address(target, tls)
    opened: list[trio.abc.Stream] = []
    try:
        with trio.fail_after(handshake_timeout):
            for _ in range(streams + urgent):
                opened.append(await _open_stream(target))
                if tls is not None:
                    opened[-1] = TLSStream(opened[-1], tls, server_hostname=target.host)
                    await tls_handshake(opened[-1], str(target))
            return await open_source(opened, token=token, compress=compress, bandwidth=bandwidth, name=str(target),
                                     frame_macs=frame_macs, urgent=urgent)
    except trio.TooSlowError:
        raise TransportError(f"{target}: no handshake within {handshake_timeout:g} s") from None
    except BaseException:
        for stream in opened:
            await trio.aclose_forcefully(stream)
        raise


async def _open_stream(target: Address) -> trio.abc.Stream:
    try:
        if target.kind == "unix":
            return await trio.open_unix_socket(target.path)
        return await trio.open_tcp_stream(target.host, target.port)
    except OSError as exc:
        raise TransportError(f"cannot connect to {target}: {exc.strerror or exc}") from exc


async def open_source(
    streams: Sequence[trio.abc.Stream],
    *,
    token: bytes | None,
    compress: str = "zstd:1",
    bandwidth: float | None = None,
    name: str = "peer",
    frame_macs: bool = False,
    urgent: bool = False,
) -> Channel:
    """Run the source's handshake over already-open ``streams`` (the first is the primary; with
    ``urgent`` the last is kept for urgent data). An urgent link is post-copy's, so the primary's
    Hello then says ``POSTCOPY_SESSION``: the destination restores into a guest it can fault."""
    counters = Counters(len(streams))
    primary = Connection(Role.SOURCE, token=token, compress=compress)
    links = [Link(0, streams[0], primary, name, counters)]
    features = link_features(streams[0], frame_macs=frame_macs) + ((POSTCOPY_SESSION,) if urgent else ())
    await _source_handshake(links[0], Hello(streams=len(streams), features=features))
    for index, stream in enumerate(streams[1:], 1):
        conn = Connection(Role.SOURCE, token=token, compress=compress, join=primary, stream=index)
        links.append(Link(index, stream, conn, f"{name} stream {index}", counters))
        features = link_features(stream, frame_macs=frame_macs)
        if urgent and index == len(streams) - 1:
            features = (*features, URGENT_STREAM)     # the receiver delivers its frames first
            if plain_socket(stream):
                features = (*features, NATIVE_FAULTS)
        await _source_handshake(links[-1], Hello(features=features))
    return Channel(Role.SOURCE, links, counters, threads=len(streams) - urgent, bandwidth=bandwidth, urgent=urgent)


async def _source_handshake(link: Link, hello: Hello) -> None:
    await link.write(link.conn.send(hello))
    try:
        await _expect(link, Hello)
    except TransportError as exc:
        wants = "a token" if isinstance(link.stream, TLSStream) else "a token, or TLS"
        raise TransportError(f"{exc}; the destination dropped our Hello (does it want {wants}, "
                             "is --insecure given to one end only, "
                             f"or does it speak a protocol version older than {PROTOCOL_VERSION}?)") from exc
    await link.write(link.conn.send(Auth()))


async def _expect(link: Link, kind: type) -> None:
    """Read one handshake event (the state table already refuses any other kind)."""
    event = await link.read()
    if not isinstance(event, kind):
        raise TransportError(f"{link.name}: connection closed during the handshake (a token mismatch?)")


# --- destination -----------------------------------------------------------------------------


async def _refuse_version(link: Link) -> None:
    """A source of another protocol version gets our Hello before we close (best effort): it
    reports the two versions itself, even an older migrator, rather than a dropped Hello."""
    refusal = link.conn.version_refusal()
    if refusal:
        try:
            await link.write(refusal)
        except TransportError:
            pass   # the peer is gone already; our own log line names the versions


class _Gathering:
    """A primary connection waiting for its parallel streams to join."""

    def __init__(self, primary: Connection) -> None:
        self.primary = primary
        self.links: dict[int, Link] = {}
        self.complete = trio.Event()
        self.finished = trio.Event()   # the session ended: joined streams' tasks may return
        self.open = True

    def add(self, link: Link) -> None:
        self.links[link.conn.stream] = link
        if len(self.links) == self.primary.streams - 1:
            self.complete.set()


class Acceptor:
    """The destination's side of every connection reaching one listener.

    ``await acceptor.handle(stream, handler)`` runs the handshake on ``stream``; a primary
    connection waits for its parallel streams, then runs ``handler(channel)`` with the channel's
    readers alive, and closes the channel when the handler returns. A joining stream is handed
    to its session. A connection that fails (bad frames, wrong token, TLS, timeout) is logged in
    one line and closed; the exception does not propagate, so a server keeps serving. Silent
    connections (nothing received before they closed or timed out: scans, floods) are logged
    once per burst. With ``tls`` (a server context) each stream is wrapped in TLS first.
    ``admitted`` (the gate's place for the connection) is released once the peer authenticated.
    """

    def __init__(
        self, *, token: bytes | None, handshake_timeout: float = HANDSHAKE_TIMEOUT_S, tls: ssl.SSLContext | None = None,
        frame_macs: bool = False, receive_buffers: int = 0,
    ) -> None:
        Connection(Role.DEST, token=token)   # validate the token once, here
        # ``receive_buffers`` > 0: the links of every session share one receive pool, that many
        # buffers warmed now (see ``serve``); else each link has its own, filled as frames come
        self._pool = None
        if receive_buffers:
            self._pool = SizedBufferPool()
            self._pool.warm(receive_buffers, WARM_BUFFER_BYTES)
        self._token = token
        self._frame_macs = frame_macs
        self._timeout = handshake_timeout
        self._tls = tls
        self._sessions: dict[bytes, _Gathering] = {}
        self._silent = Burst()

    def _lookup(self, session_id: bytes) -> Connection | None:
        gathering = self._sessions.get(session_id)
        return gathering.primary if gathering is not None and gathering.open else None

    async def handle(self, stream: trio.abc.Stream, handler: Handler, admitted: Pending | None = None) -> None:
        peer = _peer_name(stream)
        counters = Counters(1)
        try:
            await self._handle(stream, handler, peer, counters, admitted)
        except* (MigratorError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as group:
            if not self._is_silent(counters, group):
                log.warning("connection from %s failed: %s", peer, _one_line(group))
            elif self._silent.starts():
                log.warning("connection from %s failed: %s; further connections that send nothing are not logged "
                            "in this burst", peer, _one_line(group))
            await trio.aclose_forcefully(stream)
        if counters.receive_buffers:
            release_free_memory()   # the session's page buffers are free now: back to the kernel

    def _is_silent(self, counters: Counters, group: BaseExceptionGroup) -> bool:
        """Nothing came from the peer: it closed or timed out before its first frame byte (over
        TLS, only a timeout counts: a TLS failure has something to say)."""
        if counters.bytes_wire_received:
            return False
        return self._tls is None or all(isinstance(exc, _HandshakeTimeout) for exc in leaf_exceptions(group))

    async def _handle(self, stream: trio.abc.Stream, handler: Handler, peer: str, counters: Counters,
                      admitted: Pending | None) -> None:
        conn = Connection(Role.DEST, token=self._token, compress="none", sessions=self._lookup, defer_payloads=True)
        try:
            with trio.fail_after(self._timeout):
                if self._tls is not None:
                    stream = TLSStream(stream, self._tls, server_side=True)
                    await tls_handshake(stream, peer)
                link = Link(0, stream, conn, peer, counters, pool=self._pool)
                try:
                    await _expect(link, Hello)
                except RemoteProtocolError:
                    await _refuse_version(link)
                    raise
                features = link_features(stream, frame_macs=self._frame_macs)
                offered = conn.peer_hello.features
                if URGENT_STREAM in offered and NATIVE_FAULTS in offered and plain_socket(stream):
                    features = (*features, NATIVE_FAULTS)
                reply = conn.send(Hello(features=features))
                if conn.stream:
                    await link.write(reply)
                    gathering = await self._join(link, admitted)
                else:
                    gathering = _Gathering(conn)
                    links = await self._gather(link, gathering, reply, admitted)
        except trio.TooSlowError:
            raise _HandshakeTimeout(f"{peer}: handshake not finished within {self._timeout:g} s") from None
        if conn.stream:
            await gathering.finished.wait()   # the stream is the session's; keep its task alive
            return
        try:
            counters.streams = len(links)
            for index, joined in enumerate(links[1:], 1):
                counters.absorb(joined.counters)
                joined.index, joined.counters = index, counters
            channel = Channel(Role.DEST, links, counters)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel._run_readers)
                try:
                    await handler(channel)
                finally:
                    await channel.aclose()
        finally:
            gathering.finished.set()

    async def _gather(self, link: Link, gathering: _Gathering, reply: bytes, admitted: Pending | None) -> list[Link]:
        conn = link.conn
        if conn.streams > 1:
            self._sessions[conn.session_id] = gathering   # before the reply: with it the source may join
        try:
            await link.write(reply)
            await _expect(link, Auth)
            _authenticated(admitted)
            if conn.streams > 1:
                await gathering.complete.wait()
            return [link] + [gathering.links[k] for k in range(1, conn.streams)]
        except BaseException:
            gathering.finished.set()
            raise
        finally:
            gathering.open = False
            self._sessions.pop(conn.session_id, None)

    async def _join(self, link: Link, admitted: Pending | None) -> _Gathering:
        await _expect(link, Auth)
        _authenticated(admitted)
        gathering = self._sessions.get(link.conn.session_id)
        if gathering is None or not gathering.open:
            raise TransportError(f"{link.name}: stream {link.conn.stream} joined after its session gave up waiting")
        link.name = f"{link.name} stream {link.conn.stream}"
        gathering.add(link)   # the session's channel reads and closes the stream from now on
        return gathering


class _HandshakeTimeout(TransportError):
    """A connection did not finish its handshake in time."""


def _authenticated(admitted: Pending | None) -> None:
    """The source's Auth is checked (the Connection raised otherwise): the gate stops counting it."""
    if admitted is not None:
        admitted.release()


async def serve(
    address: str,
    handler: Handler,
    *,
    token: bytes | None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    tls: ssl.SSLContext | None = None,
    limits: HandshakeLimits = HandshakeLimits(),
    frame_macs: bool = False,
    receive_buffers: int = 0,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept sessions on ``address`` and run ``handler(channel)`` for each (role DEST).

    Reports the bound address ("HOST:PORT" with the real port, or "unix:PATH") through
    ``task_status``. Refuses a non-loopback address without a token: anyone who can reach it
    could inject pages (TLS does not change that: it does not say who the source is). ``tls``
    (a server context) makes every connection TLS; plain-text peers then fail their handshake.
    ``limits`` caps the connections still in their handshake (see ``_gate``); ``frame_macs`` as
    ``connect``'s. ``receive_buffers``: receive buffers of a full Pages frame to fault in before
    listening and keep for the server's life, shared by its sessions (fresh memory costs page
    faults on the receive path: a session's first frames, before its buffers are reused, went
    several times slower than the rest). A server runs for
    long: its threads allocate from the one malloc arena that can be trimmed after each session
    (``core.heap``).
    """
    use_main_arena_only()
    target = parse_address(address)
    check_tls_address(target, tls)
    if token is None and not target.is_loopback:
        raise TransportError(
            f"refusing to listen on {target} without a token: anyone who can reach it could send pages; "
            "use a token (receive without --insecure), or listen on 127.0.0.1, ::1 or a unix socket"
        )
    acceptor = Acceptor(token=token, handshake_timeout=handshake_timeout, tls=tls, frame_macs=frame_macs,
                        receive_buffers=receive_buffers)
    gate = HandshakeGate(limits)
    listeners, bound = await _listen(target)

    async def serve_one(stream: trio.SocketStream, admitted: Pending) -> None:
        await acceptor.handle(stream, handler, admitted)

    try:
        task_status.started(str(bound))
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept_connections, listener, gate, serve_one, nursery)
    finally:
        if target.kind == "unix":
            _unlink_socket(target.path)


async def _listen(target: Address) -> tuple[list[trio.SocketListener], Address]:
    try:
        if target.kind == "tcp":
            listeners = await trio.open_tcp_listeners(target.port, host=target.host)
            port = listeners[0].socket.getsockname()[1]
            return listeners, Address("tcp", host=target.host, port=port)
        _unlink_socket(target.path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(target.path)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return [trio.SocketListener(sock)], target
    except OSError as exc:
        raise TransportError(f"cannot listen on {target}: {exc.strerror or exc}") from exc


def _unlink_socket(path: str) -> None:
    """Remove a socket file left by an earlier server (never any other kind of file)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "peer"
    try:
        peer = sock.getpeername()
    except OSError:
        return "peer"
    if isinstance(peer, tuple):
        return str(Address("tcp", host=peer[0], port=peer[1]))
    return f"unix:{peer}" if peer else "unix peer"


def _one_line(group: BaseExceptionGroup) -> str:
    leaves = leaf_exceptions(group)
    return "; ".join(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}" for exc in leaves)
