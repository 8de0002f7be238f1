"""A round's pages, from the guest's memory to the sink: read, digest, cut into Pages events.

Reading and sending overlap: a reader task reads chunks of runs on a worker thread into pooled
buffers (and records each page's digest there, in C without the GIL) and feeds a bounded channel;
this task cuts each chunk into Pages events for the sink, whose transport compresses them in its
own worker threads. So a slow link slows the reader instead of filling memory. A small chunk
(a late round's few hundred pages) is read on the event loop: there is nothing to overlap it
with, and the hand-over to a worker and back would cost more than the read.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from .. import protocol as p
from ..core.buffers import BufferPool
from ..core.digest import PageDigests, hash_pages_into, new_hashes
from ..core.model import MemoryLayout, Run
from ..core.runs import Runs, count_pages, split_runs
from .sink import Sink

BATCH_PAGES = 1024       # pages per Pages event (4 MiB raw): one frame, one compression job; 4x fewer
                         # frames than 1 MiB cut the per-frame work of both ends (scripts/bench_transport.py)
READ_CHUNK_PAGES = 1024  # pages read per worker-thread call: one event's worth, about what L2 holds
MAX_RUNS_PER_EVENT = 1024  # IOV_MAX: one process_vm_readv per Pages event at most
CHUNKS_AHEAD = 2         # chunks read ahead of the sender
INLINE_PAGES = 512       # a chunk of at most this many pages is read on the event loop: handing it
                         # to a worker and back costs more than reading it while both CPUs are busy


@dataclass
class RoundTimer:
    """Timers of the round in progress (mutable scratch, frozen into RoundStats at its end)."""

    number: int
    dirty_pages: int
    started: float = field(default_factory=time.perf_counter)
    scan_s: float = 0.0
    read_s: float = 0.0
    send_s: float = 0.0
    exchange_s: float = 0.0
    zero_pages: int = 0
    bytes_raw: int = 0


class PageStream:
    """Sends runs of the guest's pages to a sink, recording what went (``digests``; ``sent`` when
    asked, for a checkpoint's manifest)."""

    def __init__(self, memory, layout: MemoryLayout, digests: PageDigests, sink: Sink, *, keep_sent: bool = False) -> None:
        self.memory = memory
        self.layout = layout
        self.digests = digests
        self.sink = sink
        self.sent: list[list[Run]] | None = [] if keep_sent else None
        self.lent = 0            # pages sent from the guest's shared memory in place (``read_chunk``)
        self._buffers = BufferPool(READ_CHUNK_PAGES * layout.page_size)

    def read_chunk(self, chunk: list[Run], buffers: BufferPool | None = None, *,
                   lend: bool = False) -> tuple[memoryview, float]:
        """The chunk's pages into a buffer of ``buffers`` (default: this stream's, a chunk's
        size), digests recorded; a worker thread's work, or a few pages' on any thread.

        ``lend``: where the memory can lend the chunk's pages in place (a shared memfd, the
        chunk's runs next to each other in it), they are sent from there, with no copy; their
        digests are of the bytes as hashed. A write between the hash and the send is a write
        after the round's scan, so the page is sent again, and the final copy sends a frozen
        guest's pages: the two ends' digests agree by then."""
        t = time.perf_counter()
        pages = count_pages(chunk)
        hashes = new_hashes(pages)    # each page hashed as it is read, while in the cache
        lent = self.memory.lend(chunk) if lend and hasattr(self.memory, "lend") else None
        if lent is not None:
            hash_pages_into(lent, pages, self.layout.page_size, hashes)
            data = lent
            self.lent += pages
        else:
            data = memoryview((buffers or self._buffers).take())[: pages * self.layout.page_size]
            self.memory.read_runs(chunk, data, hashes=hashes)
        self.digests.record_hashes(self.layout, chunk, hashes)
        return data, time.perf_counter() - t

    async def send(self, timer: RoundTimer, runs: list[Run]) -> None:
        if self.sent is not None:
            self.sent.append(runs)
        await self.stream(timer.number, split_runs(runs, READ_CHUNK_PAGES, 1 << 30, self.layout.page_size), timer=timer)

    async def stream(self, number: int, chunks: Iterable[list[Run]], *, batch_pages: int = BATCH_PAGES,
                     timer: RoundTimer | None = None) -> int:
        """Read each chunk of ``chunks`` (runs of at most READ_CHUNK_PAGES pages, taken one at a
        time by a reader task, so a generator may decide them as it goes) and send its pages as
        Pages events of at most ``batch_pages``; returns the pages sent. ``timer`` gets the
        read and send times and the bytes."""
        send_chunks, recv_chunks = trio.open_memory_channel(CHUNKS_AHEAD)
        ps, sent = self.layout.page_size, 0
        lend = self.sink.payloads_may_change

        def read(chunk: list[Run]) -> tuple[Runs, memoryview, float]:
            runs = Runs.pack(chunk)    # packed once: the read, the digests and the event share it
            return runs, *self.read_chunk(runs, lend=lend)

        async def reader() -> None:
            async with send_chunks:
                for chunk in chunks:
                    if count_pages(chunk) <= INLINE_PAGES:
                        runs, data, seconds = read(chunk)
                        await trio.lowlevel.checkpoint()
                    else:
                        runs, data, seconds = await trio.to_thread.run_sync(read, chunk)
                    if timer is not None:
                        timer.read_s += seconds
                    await send_chunks.send((runs, data))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with recv_chunks:
                async for chunk, view in recv_chunks:
                    offset = 0
                    whole = len(chunk) <= MAX_RUNS_PER_EVENT and count_pages(chunk) <= batch_pages
                    for batch in [chunk] if whole else split_runs(chunk, batch_pages, MAX_RUNS_PER_EVENT, ps):
                        size = count_pages(batch) * ps
                        t = time.perf_counter()
                        await self.sink.send(
                            p.Pages(round=number, runs=Runs.pack(batch), payload=view[offset : offset + size])
                        )
                        if timer is not None:
                            timer.send_s += time.perf_counter() - t
                        offset += size
                    sent += offset // ps
                    if timer is not None:
                        timer.bytes_raw += offset
        return sent
