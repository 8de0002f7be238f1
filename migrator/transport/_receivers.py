"""Receiving: events from one link read by the caller, or from several links gathered in order.

``DirectReceiver`` reads one link in the task that calls ``receive`` (the source's link back
from the destination, a checkpoint file). ``GatheringReceiver`` runs one reader task per link
(the destination of a session with parallel streams must drain every stream at once, or a
source blocked on a full stream would never send the barrier another stream waits for). Each
reader checks and decompresses its Pages in a worker thread. At each barrier the source sends a
``Fence`` on every link: on link 0 it holds the barrier until every other link has delivered
the data frames it counts; on another link it holds that link until the barrier is delivered.
So ``receive`` returns the data sent between two barriers between them, in any order.
"""

from __future__ import annotations

import trio

from ..errors import RemoteProtocolError, TransportError
from ..protocol import DATA_EVENTS, ConnectionClosed, Event, Fence, Layout, Pages, PendingPages
from ._link import Counters, Link
from ._threads import decode_pages

OUT_QUEUE = 8
_FAILURES = (RemoteProtocolError, TransportError)


async def decode(pending: PendingPages, counters: Counters, limiter: trio.CapacityLimiter | None = None) -> Pages:
    if pending.needs_thread:
        pages, seconds = await trio.to_thread.run_sync(decode_pages, pending, limiter=limiter)
    else:
        pages, seconds = decode_pages(pending)
    counters.decompress_seconds += seconds
    counters.bytes_raw_received += pending.raw_len
    return pages


class DirectReceiver:
    def __init__(self, link: Link, counters: Counters) -> None:
        self._link = link
        self._counters = counters
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
                        return await decode(event, self._counters)
                    if type(event) is not Fence:    # one stream: nothing to wait for
                        return event
            except _FAILURES as exc:
                self._failure = exc
                raise

    def stop(self) -> None:
        pass


class GatheringReceiver:
    def __init__(self, links: list[Link], counters: Counters) -> None:
        self._links = links
        self._counters = counters
        self._send, self._recv = trio.open_memory_channel(OUT_QUEUE)
        self._delivered = [0] * len(links)
        self._barriers = 0            # Fences of link 0 whose barrier has been delivered
        self._ended = [False] * len(links)
        self._changed = trio.Event()
        self._layout_seen = trio.Event()
        self._limiter = trio.CapacityLimiter(len(links))
        self._scope = trio.CancelScope()
        self._failure: Exception | None = None

    async def run(self) -> None:
        """Read every link until the session ends, fails, or ``stop`` is called."""
        with self._scope:
            async with trio.open_nursery() as nursery:
                async with self._send:
                    for link in self._links:
                        nursery.start_soon(self._read_loop, link, self._send.clone())

    def stop(self) -> None:
        self._scope.cancel()

    async def receive(self) -> Event:
        if self._failure is not None:
            raise self._failure
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            if self._failure is not None:
                raise self._failure from None
            return ConnectionClosed()

    def _fail(self, error: Exception) -> None:
        if self._failure is None:
            self._failure = error
        self._scope.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _read_loop(self, link: Link, out: trio.MemorySendChannel) -> None:
        async with out:
            try:
                if link.index:
                    await self._layout_seen.wait()    # its runs are checked against the Layout
                fences, after_fence = 0, False
                while True:
                    event = await link.read()
                    kind = type(event)
                    if kind is ConnectionClosed:
                        self._ended[link.index] = True
                        self._notify()
                        if link.index == 0:
                            self.stop()   # the session is over: everything was fenced before its end
                        return
                    if kind is Layout:
                        self._layout_seen.set()
                    elif kind is PendingPages:
                        event = await decode(event, self._counters, self._limiter)
                    elif kind is Fence:
                        fences += 1
                        if link.index:
                            await self._wait_until(lambda: self._barriers >= fences)
                        else:
                            await self._wait_for(event.frames)
                            after_fence = True
                        continue
                    await out.send(event)
                    if type(event) in DATA_EVENTS:
                        self._delivered[link.index] += 1
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
            await self._changed.wait()

    async def _wait_until(self, condition) -> None:
        while not condition():
            await self._changed.wait()
