"""Sending: events to frames on one or more links, compressed in worker threads, in order.

The caller of ``send`` drives the pipeline: ``send`` settles the frame's place (state, sequence
number, stream), starts its compression on a worker thread, then writes every frame that is
ready, oldest first, and returns once at most ``2 * threads + 2`` frames are outstanding. So
while frame i is written, frames i+1.. are compressing; a slow link makes ``send`` wait
(backpressure), and memory stays bounded. ``flush`` writes everything, and so does ``send`` of
any event but Pages/Zero: nothing runs in the background, so a control event (a Digest the
peer must answer, an Abort) must not wait in the queue for a later call.

A Pages frame is sampled here first (a few 4 KiB compressions): one whose payload zstd would
not shrink (random or encrypted pages) goes raw and is sealed here too, since hashing a
megabyte (~20-90 us) costs less than handing it to a worker and back (two cross-CPU wake-ups,
~64 us each). Only frames worth compressing, or MACing, go to worker threads.

With several links (parallel streams), Pages and Zero go to the link with the fewest frames
outstanding. With ``urgent`` the last link is kept for ``send(..., urgent=True)``: post-copy's
requested pages, written at once under that link's own lock, so they never wait behind the bulk
links' queues, socket buffers or the lock a bulk send holds while its socket is full (QEMU's
postcopy-preempt channel). Every other event is a barrier: it goes on link 0. If data moved since the last
barrier, a ``Fence`` listing how many data frames each link has carried goes first on every
link: the receiver delivers those frames before the barrier, and nothing that follows a Fence
on another link before the barrier (multifd's sync packets, in effect).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from itertools import islice

import trio
import zstandard

from ..core.errors import TransportError
from ..protocol import DATA_EVENTS, Event, Fence, PendingFrame
from ._limiter import TokenBucket
from ._link import Counters, Link
from ._threads import Job, ThreadJobs, finish_frame

FrameHook = Callable[[Event, int], None]   # (event, frame length) after each write
WAKE_BATCH = 2     # frames _drain waits for at once when too many are outstanding


class _Outgoing:
    __slots__ = ("link", "pending", "event", "job", "data", "written", "seconds")

    def __init__(self, link: Link, pending: PendingFrame, event: Event) -> None:
        self.link = link
        self.pending = pending
        self.event = event
        self.job: Job | None = None
        self.data: bytes | None = None
        self.written = False
        self.seconds = 0.0

    @property
    def ready(self) -> bool:
        return self.data is not None or self.job.done.is_set()


class Sender:
    def __init__(
        self,
        links: list[Link],
        counters: Counters,
        *,
        threads: int,
        bandwidth: float | None = None,
        on_written: FrameHook | None = None,
        urgent: bool = False,
    ) -> None:
        if urgent and len(links) < 2:
            raise TransportError("an urgent link needs a second link beside the bulk one")
        self._links = links
        self._urgent = links[-1] if urgent else None
        self._bulk = links[:-1] if urgent else links
        self._urgent_lock = trio.Lock()
        self._detached = False          # the urgent link was handed over: nothing more goes on it here
        self._counters = counters
        self._queues: list[deque[_Outgoing]] = [deque() for _ in links]
        self._order: deque[_Outgoing] = deque()
        self._jobs = ThreadJobs(threads, "migrator encode")
        self._bucket = TokenBucket(bandwidth) if bandwidth is not None else None
        self._lock = trio.StrictFIFOLock()
        self._max_outstanding = 2 * threads + 2
        self._fenced = (0,) * len(links)
        self._next = 0
        self._failure: TransportError | None = None
        self._on_written = on_written
        self._sampler: zstandard.ZstdCompressor | None = None   # the trio thread's own

    def set_bandwidth(self, rate: float | None) -> None:
        """Cap the link at ``rate`` bytes/s (None: uncapped) from the next frame on."""
        if rate is None:
            self._bucket = None
            return
        if self._bucket is None:
            self._bucket = TokenBucket(rate)
            self._bucket.waited = self._counters.throttle_seconds   # it keeps counting from there
        self._bucket.set_rate(rate)

    @property
    def failure(self) -> TransportError | None:
        if self._failure is None:
            self._failure = next((link.broken for link in self._links if link.broken), None)
        return self._failure

    async def send(self, event: Event, *, urgent: bool = False) -> None:
        if urgent:
            await self._send_urgent(event)
            return
        async with self._lock:
            self._check()
            if type(event) in DATA_EVENTS:
                self._queue(self._pick(), event)
            else:
                if len(self._links) > 1:
                    async with self._urgent_lock:   # the urgent link's count and Fence, unraced
                        counts = tuple(link.conn.data_frames for link in self._links)
                        if counts != self._fenced:
                            for link in self._links:
                                if link is self._urgent:
                                    if not self._detached:
                                        await self._write_now(link, Fence(frames=counts))
                                else:
                                    self._queue(link, Fence(frames=counts))
                            self._fenced = counts
                self._queue(self._links[0], event)
            await self._drain(self._max_outstanding if type(event) in DATA_EVENTS else 0)

    async def _send_urgent(self, event: Event) -> None:
        """Write a data event on the urgent link now, sealed on this thread (it is small)."""
        if self._urgent is None:
            raise TransportError("this channel has no urgent link (connect with urgent=True)")
        if self._detached:
            raise TransportError("the urgent link was handed over to post-copy's fault loop")
        if type(event) not in DATA_EVENTS:
            raise TransportError(f"only Pages and Zero go on the urgent link, not {type(event).__name__}")
        async with self._urgent_lock:
            self._check()
            await self._write_now(self._urgent, event)

    def account_urgent(self, nbytes: int) -> None:
        """``nbytes`` went on the handed-over urgent link: counted as sent, and taken from the
        bandwidth cap's tokens, as an urgent frame's are (never waiting: the bulk yields)."""
        self._counters.bytes_wire += nbytes
        if self._bucket is not None:
            self._bucket.debit(nbytes)

    async def detach_urgent(self) -> Link:
        """Hand the urgent link over: no frame, not even a barrier's Fence, is written on it from
        now on (one being written finishes first)."""
        if self._urgent is None:
            raise TransportError("this channel has no urgent link (connect with urgent=True)")
        async with self._urgent_lock:
            self._detached = True
        return self._urgent

    async def _write_now(self, link: Link, event: Event) -> None:
        pending = link.conn.send_deferred(event)
        out = _Outgoing(link, pending, event)
        out.data, out.seconds = finish_frame(pending)
        try:
            await self._write(out)
        except TransportError as exc:
            self._failure = exc
            raise

    async def flush(self) -> None:
        async with self._lock:
            self._check()
            await self._drain(0)

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _pick(self) -> Link:
        links = self._bulk
        n = len(links)
        if n == 1:
            return links[0]
        shift = min(range(n), key=lambda i: len(self._queues[links[(self._next + i) % n].index]))
        index = (self._next + shift) % n
        self._next = index + 1
        return links[index]

    def _queue(self, link: Link, event: Event) -> None:
        pending = link.conn.send_deferred(event)       # LocalProtocolError: the caller's mistake
        if pending.needs_thread and pending.compression.level is not None:
            if self._sampler is None:
                self._sampler = pending.compression.compressor()
            pending = pending.sample(self._sampler)
        out = _Outgoing(link, pending, event)
        if pending.needs_thread:
            out.job = self._jobs.submit(partial(finish_frame, pending))
        else:
            out.data = pending.finish_parts()
        self._queues[link.index].append(out)
        self._order.append(out)

    async def _drain(self, bound: int) -> None:
        """Write what is ready; wait for the oldest frames until at most ``bound`` remain.

        It waits for ``WAKE_BATCH`` frames at a time: each wait ends with a worker waking this
        thread, a cross-CPU wake-up that also tends to pull this thread onto the worker's CPU
        (the kernel takes a socket write as a hand-over), and then the two take turns on one
        CPU. Fewer wake-ups measured +8 % on half-compressible pages with one stream."""
        try:
            while True:
                for queue in self._queues:
                    while queue and queue[0].ready:
                        await self._write(queue[0])
                        queue.popleft()
                while self._order and self._order[0].written:
                    self._order.popleft()
                if len(self._order) <= bound:
                    return
                for out in islice(self._order, WAKE_BATCH):
                    if not (out.written or out.ready):
                        await out.job.done.wait()
        except TransportError as exc:
            self._failure = exc
            raise

    async def _write(self, out: _Outgoing) -> None:
        if out.data is None:
            out.data, out.seconds = out.job.result()
            out.job = None
        data = out.data
        if self._bucket is not None and out.link is self._urgent:
            self._bucket.debit(sum(map(len, data)))    # never behind a bulk frame's reservation
        elif self._bucket is not None:
            await self._bucket.consume(sum(map(len, data)))
            self._counters.throttle_seconds = self._bucket.waited
        await out.link.write(data)
        out.written = True
        out.data = None
        counters = self._counters
        counters.bytes_raw += out.pending.raw_len
        counters.compress_seconds += out.seconds
        if self._on_written is not None:
            self._on_written(out.event, sum(map(len, data)))
