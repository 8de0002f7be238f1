"""``Channel``: one migration session over one or more byte streams, as events.

Made by ``connect``/``open_source`` (role SOURCE) or handed to a ``serve`` handler (role DEST),
after the handshake. Sending is driven by the callers of ``send``/``flush`` (see ``_sender``);
a destination's streams are read by reader tasks that its ``serve`` runs. Usable as an async
context manager (``aclose`` on exit) or closed explicitly.

Ordering: Pages and Zero events between two other events may arrive in any order among
themselves (parallel streams), but every event sent before a non-Pages/Zero event is received
before it. ``flush`` returns once everything sent so far is on the wire.
"""

from __future__ import annotations

import os

import trio

from ..core.errors import LocalProtocolError, TransportError
from ..protocol import NATIVE_FAULTS, URGENT_STREAM, ConnectionClosed, Event, Hello, Role
from ._link import ChannelStats, Counters, Link, plain_socket
from ._receivers import DirectReceiver, GatheringReceiver
from ._sender import Sender


class Channel:
    def __init__(
        self,
        role: Role,
        links: list[Link],
        counters: Counters,
        *,
        threads: int = 1,
        bandwidth: float | None = None,
        urgent: bool = False,
    ) -> None:
        self.role = role
        self._links = links
        self._counters = counters
        if role is Role.SOURCE:
            self._sender = Sender(links, counters, threads=threads, bandwidth=bandwidth, urgent=urgent)
            self._receiver: DirectReceiver | GatheringReceiver = DirectReceiver(links[0], counters)
        else:
            self._sender = Sender(links[:1], counters, threads=1, bandwidth=bandwidth)
            urgent_links = [link.index for link in links[1:]
                            if link.conn.peer_hello is not None and URGENT_STREAM in link.conn.peer_hello.features]
            self._receiver = GatheringReceiver(links, counters, urgent=urgent_links[-1] if urgent_links else None)
        self._urgent_link = (links[-1] if urgent else None) if role is Role.SOURCE else (
            links[urgent_links[-1]] if urgent_links else None)
        self._closed = False

    # --- what the session is ---------------------------------------------------------------

    @property
    def peer(self) -> Hello:
        """The other side's Hello (version, page size, features)."""
        return self._links[0].conn.peer_hello

    @property
    def name(self) -> str:
        """Who the other end is, as this side reached it: the address connected to (a source),
        the address a connection came from (a destination)."""
        return self._links[0].name

    @property
    def streams(self) -> int:
        return len(self._links)

    @property
    def authenticated(self) -> bool:
        return self._links[0].conn.authenticated

    @property
    def frame_macs(self) -> bool:
        """Whether this session's frames carry MACs (see ``protocol.CHECKSUM_FRAMES``)."""
        return any(link.conn.frame_macs for link in self._links)

    @property
    def payloads_may_change(self) -> bool:
        """Whether a Pages payload may be live memory (see ``Connection.payloads_may_change``)."""
        return all(link.conn.payloads_may_change for link in self._links)

    @property
    def native_faults(self) -> bool:
        """Whether post-copy may hand the urgent link to its native fault loops after the switch
        (``take_urgent_socket``): both ends said ``NATIVE_FAULTS`` on it (each its own stream a
        plain socket) and its frames need no tags, so the loops' untagged records carry what
        the frames would carry untagged."""
        link = self._urgent_link
        return (link is not None and link.conn.untagged and link.conn.peer_hello is not None
                and NATIVE_FAULTS in link.conn.peer_hello.features and plain_socket(link.stream))

    async def take_urgent_socket(self) -> int:
        """End framing on the urgent link and return a duplicate of its socket (the caller closes
        it; the link's own closes with the channel). The source calls it after the barrier that
        hands the link over, and writes no frame on it again; the destination once it has
        received that barrier, and reads none from it again."""
        if not self.native_faults:
            raise TransportError("this session's urgent link cannot be handed over (see Channel.native_faults)")
        if self.role is Role.SOURCE:
            link = await self._sender.detach_urgent()
        else:
            link = await self._receiver.detach_urgent()
        return os.dup(link.stream.socket.fileno())

    def account_urgent(self, nbytes: int) -> None:
        """A source's handed-over urgent link carried ``nbytes`` more: counted in the statistics
        and taken from ``set_bandwidth``'s cap, as the frames it no longer carries would be."""
        self._sender.account_urgent(nbytes)

    @property
    def session_id(self) -> bytes:
        return self._links[0].conn.session_id

    def statistics(self) -> ChannelStats:
        return self._counters.freeze()

    def set_bandwidth(self, rate: float | None) -> None:
        """Cap what this side sends at ``rate`` bytes/s (None: uncapped), from the next frame on."""
        self._sender.set_bandwidth(rate)

    def place_pages(self, placer) -> None:
        """From the next large raw Pages frame on, receive payloads where ``placer`` says (see
        ``Link``): such frames are delivered as ``PlacedPages``. Only into memory a failed
        session throws away: nothing vouches for a placed payload until its frame's tags are
        checked, after it landed."""
        for link in self._links:
            link.placer = placer

    # --- moving events ---------------------------------------------------------------------

    async def send(self, event: Event, *, urgent: bool = False) -> None:
        """Send ``event``. Pages and Zero may return before they are compressed and written
        (``flush`` waits for them); any other event returns once it and everything before it
        is written. ``urgent`` (a source connected with ``urgent=True``; Pages and Zero only)
        writes it at once on the link kept for that, ahead of anything queued on the others;
        it is ordered before the next barrier, like any data event.

        Raises LocalProtocolError if the event is not allowed now, TransportError if the
        connection failed."""
        self._check_open()
        try:
            await self._sender.send(event, urgent=urgent)
        except LocalProtocolError:
            self._raise_receive_failure()   # bad data from the peer broke the connection first
            raise

    async def flush(self) -> None:
        """Wait until every event sent so far is written to the stream(s)."""
        self._check_open()
        try:
            await self._sender.flush()
        except LocalProtocolError:
            self._raise_receive_failure()
            raise

    async def receive(self) -> Event:
        """The next event from the peer. Raises RemoteProtocolError on bad data and
        TransportError when the connection fails or ends."""
        self._check_open()
        event = await self._receiver.receive()
        if type(event) is ConnectionClosed:
            raise TransportError(f"{self._links[0].name}: connection closed by peer")
        return event

    async def aclose(self) -> None:
        """Write what is queued (if the channel is healthy), then close every stream."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._sender.failure is None:
                await self._sender.flush()
        finally:
            self._receiver.stop()
            with trio.CancelScope(shield=True):
                for link in self._links:
                    await link.aclose()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    def _raise_receive_failure(self) -> None:
        """A destination's reader tasks read ahead: when bad data from the peer put the shared
        connection in ERROR, a send fails as a misuse; say what the peer did instead."""
        if self._receiver.failure is not None:
            raise self._receiver.failure

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the channel is closed")

    async def _run_readers(self) -> None:
        """Destination only: read every stream (run in the nursery of the serve handler)."""
        await self._receiver.run()
