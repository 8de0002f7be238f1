"""Where a migration's pages go: a live peer, or an image file.

The phases (``rounds``, ``switchover``) send events to a sink and never ask what it is. The two
sinks differ in exactly what a reader of the engine needs to know:

- ``PeerSink``: a receiver on the other end of ``transport.connect``. It answers: a task reads
  its events (an Abort ends the migration), rounds wait for its acknowledgement, and the commit
  is an exchange. Leaving it before the commit tells the peer to discard its copy.
- ``ImageSink``: a checkpoint image written through ``transport.open_file_writer``. Nobody
  answers; leaving it before it is sealed discards the file.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .. import protocol as p
from ..core.deadlines import deadline
from ..core.errors import MigrationFailed, MigratorError
from ..transport import connect, open_file_writer

HANDSHAKE_TIMEOUT_S = 30.0
REQUESTS_QUEUED = 64     # post-copy requests read ahead of the task that serves them
ABORT_SEND_S = 2.0       # how long telling the peer to discard may take, when leaving on a failure
CLOSE_S = 5.0            # how long closing the channel may take


class Sink:
    """What the phases see of a sink: events in, in order; ``acknowledges`` says whether anyone
    answers (then rounds wait for the answer, and the switch-over is an exchange)."""

    acknowledges: bool

    def __init__(self, channel) -> None:
        self.channel = channel

    @property
    def payloads_may_change(self) -> bool:
        """Whether a Pages payload may be the guest's live memory rather than a copy (a link
        whose payloads carry no tag and are not compressed: see
        ``transport.Channel.payloads_may_change``; an image's never)."""
        return bool(getattr(self.channel, "payloads_may_change", False))

    async def send(self, event: p.Event) -> None:
        await self.channel.send(event)

    async def flush(self) -> None:
        await self.channel.flush()

    def statistics(self):
        return self.channel.statistics()


class PeerSink(Sink):
    """A live receiver: ``async with PeerSink.open(address, ...) as sink``."""

    acknowledges = True

    def __init__(self, channel) -> None:
        super().__init__(channel)
        self.committed = False
        self.peer_digest: p.Digest | None = None
        self._acks_in, self._acks = trio.open_memory_channel(4)
        # post-copy: the destination's page requests, apart from its Acks (they never wait behind one)
        self._requests_in, self.requests = trio.open_memory_channel(REQUESTS_QUEUED)
        self.lacking: list[p.Run] = []   # a resumed post-copy: what the destination still lacks

    @classmethod
    @asynccontextmanager
    async def open(cls, address: str, *, token: bytes | None, compress: str, streams: int,
                   bandwidth: float | None, tls: ssl.SSLContext | None,
                   frame_macs: bool = False, urgent: bool = False) -> AsyncIterator[PeerSink]:
        """Connect; while the block runs a task reads the peer. Leaving on a failure before the
        commit tells the peer to discard its copy. ``urgent``: one more connection, for
        post-copy's requested pages."""
        with deadline(HANDSHAKE_TIMEOUT_S, f"connecting to {address} (handshake)"):
            channel = await connect(address, token=token, compress=compress, streams=streams,
                                    bandwidth=bandwidth, tls=tls, frame_macs=frame_macs, urgent=urgent)
        sink = cls(channel)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink._watch_peer)
                try:
                    yield sink
                except BaseException:
                    if not sink.committed:
                        with trio.move_on_after(ABORT_SEND_S, shield=True):
                            await sink._send_abort("source failed")
                    raise
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(CLOSE_S, shield=True):
                await channel.aclose()

    async def send(self, event: p.Event, *, urgent: bool = False) -> None:
        """``urgent``: on the urgent link (post-copy's requested pages; see ``transport.connect``)."""
        await self.channel.send(event, urgent=urgent)

    async def _send_abort(self, reason: str) -> None:
        try:
            await self.channel.send(p.Abort(reason=reason))
            await self.channel.flush()
        except (MigratorError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone already: it discards its copy on EOF

    async def _watch_peer(self) -> None:
        """Read what the destination says; an Abort ends the migration (before commit)."""
        while True:
            event = await self.channel.receive()
            if isinstance(event, p.Abort):
                raise MigrationFailed(f"destination aborted: {event.reason}")
            if isinstance(event, p.Request):
                await self._requests_in.send(event)
                continue
            if isinstance(event, p.Lacking):
                self.lacking.extend(event.runs)
                continue
            await self._acks_in.send(event)

    async def expect_ack(self, of: p.Acked) -> p.Ack:
        """The peer's next Ack, which must answer ``of``; a Digest it sends meanwhile is kept."""
        while True:
            event = await self._acks.receive()
            if isinstance(event, p.Ack) and event.of is of:
                return event
            if isinstance(event, p.Digest):
                self.peer_digest = event
                continue
            raise MigrationFailed(f"destination sent {type(event).__name__} while an Ack of {of.value} was awaited")

    async def commit(self) -> p.Ack:
        """Send Commit (the point of no return) and return the peer's answer."""
        self.committed = True
        await self.channel.send(p.Commit())
        await self.channel.flush()
        return await self.expect_ack(p.Acked.COMMIT)


class ImageSink(Sink):
    """A checkpoint image's stream file: ``async with ImageSink.open(path, ...) as sink``.
    ``seal()`` ends the stream (Index, fsync); leaving without sealing discards it."""

    acknowledges = False

    def __init__(self, channel) -> None:
        super().__init__(channel)
        self.sealed = False

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str, *, token: bytes | None, compress: str) -> AsyncIterator[ImageSink]:
        sink = cls(await open_file_writer(path, token=token, compress=compress))
        try:
            yield sink
        finally:
            if not sink.sealed:
                sink.channel.discard()      # nobody to tell: a failed image is never sealed, nor named

    async def expect_ack(self, of: p.Acked) -> p.Ack:
        raise MigratorError(f"an image file acknowledges nothing (an Ack of {of.value} was awaited)")

    async def seal(self) -> None:
        await self.channel.aclose()
        self.sealed = True
