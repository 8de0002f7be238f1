"""Receiving: events from one link read by the caller, or from several links gathered in order.

``DirectReceiver`` reads one link in the task that calls ``receive`` (the source's link back
from the destination, a checkpoint file). ``GatheringReceiver`` runs two tasks per link (the
destination of a session with parallel streams must drain every stream at once, or a source
blocked on a full stream would never send the barrier another stream waits for): a reader that
starts checking and decompressing each Pages frame on a worker thread and reads on, and a
deliverer that hands the link's events out in order. Up to ``DECODE_AHEAD`` frames of a link
are decoded while its reader goes on, so neither the reader nor the workers wait for each
other frame by frame (each such wait is a cross-CPU wake-up, ~64 us here).

At each barrier the source sends a ``Fence`` on every link: on link 0 it holds the barrier until
every other link has delivered the data frames it counts; on another link it holds that link
until the barrier is delivered. So ``receive`` returns the data sent between two barriers
between them, in any order.

A link the source marked urgent (its Hello's ``URGENT_STREAM``: post-copy's requested pages)
is delivered first: ``receive`` takes its events ahead of everything queued from the others,
so a requested page never waits behind a backlog of pushed ones. Data sent before a barrier
still comes before it; urgent data sent after a barrier may come before that barrier's event.
"""

from __future__ import annotations

import contextlib
from functools import partial

import trio

from ..core.errors import RemoteProtocolError, TransportError
from ..protocol import DATA_EVENTS, ConnectionClosed, Event, Fence, Layout, Pages, PendingPages, PlacedPages
from ._link import Counters, Link
from ._threads import Job, ThreadJobs, decode_pages

OUT_QUEUE = 4        # events delivered, waiting for receive()
DECODE_AHEAD = 3     # frames per link decoding while its reader reads on
_FAILURES = (RemoteProtocolError, TransportError)
FAILURE_GRACE_S = 1.0  # how long a failed link waits for its deliverer to hand out what came before


def start_decode(pending: PendingPages, jobs: ThreadJobs) -> Job | tuple[Pages, float]:
    """Check and decompress on a worker thread; a raw checksummed payload (a hash, ~20 us per
    MiB) is cheaper to check here than to hand over."""
    if pending.needs_thread:
        return jobs.submit(partial(decode_pages, pending))
    return decode_pages(pending)


async def finish_decode(started: Job | tuple[Pages, float], raw_len: int, counters: Counters) -> Pages:
    if type(started) is Job:
        await started.done.wait()
        started = started.result()
    pages, seconds = started
    counters.decompress_seconds += seconds
    counters.bytes_raw_received += raw_len
    return pages


class _Decoding:
    """A Pages frame on its way from a link's reader to its deliverer."""

    __slots__ = ("raw_len", "started")

    def __init__(self, pending: PendingPages, jobs: ThreadJobs) -> None:
        self.raw_len = pending.raw_len
        self.started = start_decode(pending, jobs)


class _Failed:
    """A link's reader failed; its deliverer hands out what was read before, then says so."""

    __slots__ = ("error", "reached")

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.reached = trio.Event()


class DirectReceiver:
    def __init__(self, link: Link, counters: Counters) -> None:
        self._link = link
        self._counters = counters
        self._jobs = ThreadJobs(1, "migrator decode")
        self._lock = trio.StrictFIFOLock()
        self._failure: Exception | None = None

    async def receive(self) -> Event:
        """The next event, or ConnectionClosed at a clean end."""
        async with self._lock:
            if self._failure is not None:
                raise self._failure
            try:
                while True:
                    event = await self._link.read()
                    if type(event) is PendingPages:
                        return await finish_decode(start_decode(event, self._jobs), event.raw_len, self._counters)
                    if type(event) is not Fence:    # one stream: nothing to wait for
                        return event
            except _FAILURES as exc:
                self._failure = exc
                raise

    @property
    def failure(self) -> Exception | None:
        """Why receiving failed (bad data, a lost stream), once it has."""
        return self._failure

    def stop(self) -> None:
        pass


_POKE = object()     # put in the shared queue when an urgent event waits: wakes a blocked receive


class GatheringReceiver:
    def __init__(self, links: list[Link], counters: Counters, *, urgent: int | None = None) -> None:
        self._links = links
        self._counters = counters
        self._send, self._recv = trio.open_memory_channel(OUT_QUEUE)
        self._urgent = urgent
        self._urgent_send, self._urgent_recv = trio.open_memory_channel(OUT_QUEUE)
        self._delivered = [0] * len(links)
        self._fences = [0] * len(links)   # Fences each link's deliverer has read
        self._scopes = [trio.CancelScope() for _ in links]   # a link's reader and deliverer
        self._barriers = 0            # Fences of link 0 whose barrier has been delivered
        self._ended = [False] * len(links)
        self._changed = trio.Event()
        self._waiting = 0             # deliverers waiting for _changed
        self._layout_seen = trio.Event()
        self._jobs = ThreadJobs(len(links), "migrator decode")
        self._scope = trio.CancelScope()
        self._failure: Exception | None = None

    async def run(self) -> None:
        """Read every link until the session ends, fails, or ``stop`` is called."""
        with self._scope:
            async with trio.open_nursery() as nursery:
                async with self._send:
                    for link in self._links:
                        urgent = link.index == self._urgent
                        out = self._urgent_send.clone() if urgent else self._send.clone()
                        nursery.start_soon(self._run_link, link, out, self._send.clone() if urgent else None)
                    self._urgent_send.close()

    async def _run_link(self, link: Link, out: trio.MemorySendChannel, poke: trio.MemorySendChannel | None) -> None:
        with self._scopes[link.index]:
            async with trio.open_nursery() as nursery:
                items_in, items_out = trio.open_memory_channel(DECODE_AHEAD)
                nursery.start_soon(self._read_loop, link, items_in)
                nursery.start_soon(self._deliver_loop, link, items_out, out, poke)

    async def detach_urgent(self) -> Link:
        """Stop reading the urgent link, for another reader to take its socket over: once it has
        read the Fence of every barrier link 0 has (the source writes nothing on it after the
        barrier that hands it over, so nothing more is in it), its tasks end. RemoteProtocolError
        if bytes past that Fence had come already (they are not ours to lose)."""
        if self._urgent is None:
            raise TransportError("this session has no urgent link")
        index = self._urgent
        await self._wait_until(lambda: self._fences[index] >= self._fences[0] or self._ended[index])
        self._scopes[index].cancel()
        self._ended[index] = True
        link = self._links[index]
        if link.conn.buffered:
            raise RemoteProtocolError(f"{link.name}: {link.conn.buffered} bytes came on the urgent link after it was handed over")
        self._urgent = None
        return link

    @property
    def failure(self) -> Exception | None:
        """Why receiving failed (bad data, a lost stream), once it has."""
        return self._failure

    def stop(self) -> None:
        self._scope.cancel()

    async def receive(self) -> Event:
        if self._failure is not None:
            try:
                while (event := self._recv.receive_nowait()) is _POKE:   # what was delivered before the failure
                    pass
                return event
            except (trio.WouldBlock, trio.EndOfChannel):
                raise self._failure from None
        while True:
            try:
                return self._urgent_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                pass
            try:
                event = await self._recv.receive()
            except trio.EndOfChannel:
                if self._failure is not None:
                    raise self._failure from None
                return ConnectionClosed()
            if event is not _POKE:
                return event

    def _fail(self, error: Exception) -> None:
        if self._failure is None:
            self._failure = error
        self._scope.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _read_loop(self, link: Link, items: trio.MemorySendChannel) -> None:
        """Read the link's events and start decoding each Pages frame; hand both, in order, to
        the link's deliverer."""
        async with items:
            try:
                if link.index:
                    await self._layout_seen.wait()    # its runs are checked against the Layout
                while True:
                    event = await link.read()
                    if type(event) is PendingPages:
                        await items.send(_Decoding(event, self._jobs))
                        continue
                    if type(event) is Layout:
                        self._layout_seen.set()
                    await items.send(event)
                    if type(event) is ConnectionClosed:
                        return
            except _FAILURES as exc:
                # Events read before the failure are delivered first, unless the deliverer is
                # held up (a Fence waiting on another link) for longer than FAILURE_GRACE_S.
                failed = _Failed(exc)
                with trio.move_on_after(FAILURE_GRACE_S):
                    await items.send(failed)
                    await failed.reached.wait()
                self._fail(exc)

    async def _deliver_loop(self, link: Link, items: trio.MemoryReceiveChannel, out: trio.MemorySendChannel,
                            poke: trio.MemorySendChannel | None = None) -> None:
        """``poke``: the urgent link's handle on the shared queue, to wake a receive blocked on it."""
        async with items, out, poke or contextlib.nullcontext():
            try:
                fences, after_fence = 0, False
                async for event in items:
                    if type(event) is _Failed:
                        self._fail(event.error)   # before this deliverer's end can look like EOF
                        event.reached.set()
                        return
                    if type(event) is _Decoding:
                        event = await finish_decode(event.started, event.raw_len, self._counters)
                    kind = type(event)
                    if kind is ConnectionClosed:
                        self._ended[link.index] = True
                        self._notify()
                        if link.index == 0:
                            self.stop()   # the session is over: everything was fenced before its end
                        return
                    if kind is Fence:
                        fences += 1
                        self._fences[link.index] = fences
                        if self._waiting:
                            self._notify()
                        if link.index:
                            await self._wait_until(lambda: self._barriers >= fences)
                        else:
                            await self._wait_for(event.frames)
                            after_fence = True
                        continue
                    await out.send(event)
                    if poke is not None:
                        with contextlib.suppress(trio.WouldBlock):
                            poke.send_nowait(_POKE)    # a receive blocked on the shared queue looks again
                    if kind in DATA_EVENTS or kind is PlacedPages:
                        self._delivered[link.index] += 1
                        if self._waiting:
                            self._notify()
                    elif after_fence:
                        after_fence = False
                        self._barriers = fences
                        self._notify()
            except _FAILURES as exc:
                self._fail(exc)

    async def _wait_for(self, frames: tuple[int, ...]) -> None:
        """Link 0's barrier waits until the other links delivered what the Fence counts."""
        while True:
            behind = [k for k in range(1, len(frames)) if self._delivered[k] < frames[k]]
            if not behind:
                return
            for k in behind:
                if self._ended[k]:
                    raise TransportError(
                        f"{self._links[k].name}: stream {k} ended after {self._delivered[k]} of {frames[k]} data frames"
                    )
            await self._wait_changed()

    async def _wait_until(self, condition) -> None:
        while not condition():
            await self._wait_changed()

    async def _wait_changed(self) -> None:
        self._waiting += 1
        try:
            await self._changed.wait()
        finally:
            self._waiting -= 1
