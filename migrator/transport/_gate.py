"""A receiver's door: which connections it accepts, how many may wait to authenticate, and what
it does when accept(2) fails for want of resources.

Why not ``trio.serve_listeners``: under a flood of idle connections a receiver ran out of file
descriptors, every later accept failed with EMFILE (each failure logged with a full traceback),
and a real source's connection waited in the kernel's backlog until its own handshake timed out.
Here:

* Every accepted connection is *pending* until its handshake authenticates it (the source's
  Auth checked; with no token, until the handshake completes): at most ``HandshakeLimits.total``
  connections are pending at once, at most ``per_peer`` from one peer address (an IPv6 peer: its
  /64 network; a unix-socket peer: its uid). Authenticated connections are never counted, so a
  migration in progress is never closed for a flood.
* A connection past a cap closes the *oldest* pending one at once, of the same peer for the
  per-peer cap, of all for the total; the new one takes its place. Refusing the newest instead
  would let anyone lock every source out with a cap's worth of idle connections per handshake
  timeout; closing the oldest means a flood must keep outpacing a real handshake (a round trip)
  to keep one source out, and a one-off flood of any size is forgotten as soon as it stops.
* accept(2) failing with EMFILE, ENFILE, ENOBUFS or ENOMEM leaves the connection in the kernel's
  backlog: the loop pauses ``ACCEPT_PAUSE_S`` and tries again, logging one line per burst.

Log lines that a flood would multiply (closures at the cap, accept failures) are written once per
burst: a burst ends after ``BURST_QUIET_S`` without another.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..core.errors import TransportError

# The caps fit with room to spare in the usual 1,024 file descriptors, and let one source open
# its largest number of parallel streams (net.MAX_STREAMS) at once.
MAX_HANDSHAKES = 256
MAX_HANDSHAKES_PER_PEER = 64
IPV6_PEER_PREFIX = 64           # IPv6 peers count per /64 network
ACCEPT_PAUSE_S = 0.1
BURST_QUIET_S = 10.0
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

log = logging.getLogger("migrator.transport")


@dataclass(frozen=True, slots=True)
class HandshakeLimits:
    """How many connections may wait to authenticate at once: in all, and from one peer."""

    total: int = MAX_HANDSHAKES
    per_peer: int = MAX_HANDSHAKES_PER_PEER

    def __post_init__(self) -> None:
        for name in ("total", "per_peer"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise TransportError(f"handshake limit {name} must be a whole number >= 1, not {value!r}")


class Burst:
    """Says whether an event starts a new burst (none in the last ``quiet_s`` seconds)."""

    def __init__(self, quiet_s: float = BURST_QUIET_S) -> None:
        self.quiet_s = quiet_s
        self._last = -float("inf")

    def starts(self) -> bool:
        now = trio.current_time()
        new = now - self._last >= self.quiet_s
        self._last = now
        return new


class Pending:
    """One accepted connection's place at the gate; its task runs inside ``scope``."""

    __slots__ = ("peer", "scope", "_gate")

    def __init__(self, gate: HandshakeGate, peer: str) -> None:
        self.peer = peer
        self.scope = trio.CancelScope()
        self._gate = gate

    def release(self) -> None:
        """The connection no longer waits: its peer authenticated, or it ended. Idempotent."""
        self._gate.release(self)


class HandshakeGate:
    """The connections waiting to authenticate, oldest first, and the caps on them."""

    def __init__(self, limits: HandshakeLimits = HandshakeLimits()) -> None:
        self.limits = limits
        self._all: dict[Pending, None] = {}              # insertion order: oldest first
        self._by_peer: dict[str, dict[Pending, None]] = {}
        self._burst = Burst()

    def admit(self, peer: str) -> Pending:
        """A place for a new connection from ``peer``, closing the oldest pending one if a cap
        is reached."""
        mine = self._by_peer.setdefault(peer, {})
        if len(mine) >= self.limits.per_peer:
            self._close(next(iter(mine)), f"{len(mine)} from {peer}, the most one peer may have")
        elif len(self._all) >= self.limits.total:
            self._close(next(iter(self._all)), f"{len(self._all)} in all, the most there may be")
        ticket = Pending(self, peer)
        self._all[ticket] = None
        mine[ticket] = None
        return ticket

    def release(self, ticket: Pending) -> None:
        """``ticket`` no longer waits; idempotent."""
        if ticket not in self._all:
            return
        del self._all[ticket]
        mine = self._by_peer[ticket.peer]
        del mine[ticket]
        if not mine:
            del self._by_peer[ticket.peer]

    def _close(self, oldest: Pending, reached: str) -> None:
        self.release(oldest)
        oldest.scope.cancel()
        if self._burst.starts():
            log.warning("closing the oldest connections waiting to authenticate (the first from %s): %s "
                        "(--max-handshakes, --max-handshakes-per-peer); further closures in this burst are not logged",
                        oldest.peer, reached)


Serve = Callable[[trio.SocketStream, Pending], Awaitable[None]]


async def accept_connections(listener: trio.SocketListener, gate: HandshakeGate, serve_one: Serve,
                             nursery: trio.Nursery) -> None:
    """Accept connections on ``listener`` until cancelled, each served by ``serve_one(stream,
    pending)`` in its own task in ``nursery`` (closed when it returns or the gate closes it)."""
    busy = Burst()
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                if busy.starts():
                    log.warning("cannot accept connections: %s (%s); pausing accepts while it lasts, "
                                "further failures in this burst are not logged",
                                errno.errorcode[exc.errno], os.strerror(exc.errno))
                await trio.sleep(ACCEPT_PAUSE_S)
                continue
            ticket = gate.admit(peer_key(stream.socket))
            nursery.start_soon(_serve, stream, ticket, serve_one)


async def _serve(stream: trio.SocketStream, ticket: Pending, serve_one: Serve) -> None:
    try:
        with ticket.scope:
            await serve_one(stream, ticket)
    finally:
        ticket.release()
        await trio.aclose_forcefully(stream)


_PEERCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


def peer_key(sock) -> str:
    """Whom the caps count a connection against: the peer's IPv4 address (also when it comes
    IPv4-mapped), the /64 network of an IPv6 one (one host's share: it may pick any address
    in it), or for a unix socket the peer's uid."""
    if sock.family == socket.AF_UNIX:
        try:
            _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError:
            return "unix"
        return f"unix uid {uid}"
    try:
        host = sock.getpeername()[0]
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except (OSError, ValueError):
        return "unknown"
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, IPV6_PEER_PREFIX), strict=False))
