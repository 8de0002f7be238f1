"""Post-copy, seen from the source: switch early, then deliver the stale pages, requested ones first.

::

    Discard (what the last scan found) ─ Ack ─ freeze ─ final scan ─ Discard (written since)
      ─ Switch ─ Ack(switch) ══ COMMIT (point of no return) ─ Ack(commit)      [the downtime ends]
      ─ every stale page once: on the destination's Request first, else pushed in address order
      ─ RoundEnd(final) ─ Digest ─ Ack(digest) ─ terminate the source guest

Discarding what the last scan found happens before the freeze, so only the pages written after
that scan are dropped inside the downtime. Until Ack(switch) a failure resumes the source, as in
pre-copy. From Commit on the destination's guest runs and the source never resumes; its frozen
memory is the only copy of the pages not yet delivered, so a failure keeps it frozen (never
killed) and says how many pages were still owed.

Requested pages go on a connection of their own (the sink's urgent link, as QEMU's
postcopy-preempt channel), written the moment they are read: they never wait behind the push's
queued frames or its full socket buffers. Where the link allows it (``Channel.native_faults``:
an authenticated loopback or unix-socket link) the link is handed over at the switch to a
native loop (``NativeRequests``) that answers without this process's event loop or GIL; else
they are answered here, as frames.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import trio

from .. import protocol as p
from ..core.buffers import BufferPool
from ..core.digest import PageDigests
from ..core.errors import MigrationFailed
from ..core.model import Region, Run
from ..core.pagestate import PageStates
from ..core.runs import count_pages, split_runs, union
from .attach import AttachedGuest
from .native_requests import NativeRequests
from .pages import MAX_RUNS_PER_EVENT, READ_CHUNK_PAGES, PageStream
from .rounds import ms
from .sink import PeerSink
from .switchover import Switchover, freeze_and_scan

DISCARD_RUNS_PER_EVENT = 1 << 16
SETTLE_SCANS = 3             # scans after the first drop, before the freeze, while they find much
SETTLE_PAGES = 1024          # a scan finding at most this many written pages ends them
UNDROPPED_PAGES = 4096       # the last settle scan's new pages, at most this many, are dropped inside the downtime
PUSH_FRAME_PAGES = 256       # pages per pushed event: requested pages have a link of their own, but
                             # each end checks or hashes an event at a time on the thread that serves them
REQUEST_PAGES = 64           # pages per answered event; also the head sent before the commit
STALE, SENT = 1, 0           # page states: still owed to the destination, or delivered
_SENT_BYTE = bytes([SENT])
ACCOUNT_S = 0.01             # how often the native loop's bytes are taken from the bandwidth cap


@dataclass
class PostcopyStats:
    """The post-copy phase, filled in as it goes (frozen into the report at the end)."""

    stale_pages: int = 0
    discarded_ahead: int = 0         # stale pages dropped before the freeze
    settle_scans: int = 0            # scans between the first drop and the freeze
    native_faults: bool = False      # requests answered by the native loop on the urgent link
    recoveries: int = 0              # sessions that took over after the link broke
    resent_pages: int = 0            # pages sent again after such a break
    pushed_pages: int = 0
    requested_pages: int = 0         # pages sent because the destination's guest faulted on them
    duplicate_pages: int = 0         # pages a request named after the push had sent them: sent again
    requests: int = 0
    started: float = 0.0             # when the commit was acknowledged: the guest runs there
    duration_s: float | None = None  # from then until the destination verified every page
    guest_rate_before: float | None = None   # the guest's writes/s before the freeze
    dest: dict[str, float] = field(default_factory=dict)   # the destination's measurements


class StalePages:
    """Which pages the destination lacks, in one page-state table that the delivery takes over:
    SENT (it has them) or STALE (owed: dropped there, or in ``undropped``). Nothing here walks
    run lists in Python: the downtime only ever adds what the final scan found."""

    def __init__(self, layout) -> None:
        self.layout = layout
        self.states = PageStates(layout)
        self.undropped: list[Run] = []   # stale, not yet dropped there (the last settle scan's)

    def mark(self, runs: list[Run]) -> list[Run]:
        """``runs`` are stale; returns those that were not already (to be dropped there)."""
        return self.states.claim(runs, SENT, STALE) if runs else []

    @property
    def count(self) -> int:
        return self.states.count(STALE)

    def unsent_spans(self) -> tuple[Region, ...]:
        """Per region, the range from its first page that is not stale to its last: the only
        pages whose writes still matter (every other page is sent from the frozen guest after
        the switch, whatever it holds). Empty when every page is stale."""
        table, ps, spans, first = self.states.table, self.layout.page_size, [], 0
        for region in self.layout.regions:
            end = first + region.length // ps
            lo = table.find(_SENT_BYTE, first, end)
            if lo >= 0:
                hi = table.rfind(_SENT_BYTE, first, end)
                spans.append(Region(region.start + (lo - first) * ps, (hi - lo + 1) * ps))
            first = end
        return tuple(spans)


async def _send_discards(sink: PeerSink, runs: list[Run], number: int) -> None:
    for first in range(0, len(runs), DISCARD_RUNS_PER_EVENT):
        await sink.send(p.Discard(round=number, runs=tuple(runs[first : first + DISCARD_RUNS_PER_EVENT])))


async def _drop(sink: PeerSink, runs: list[Run], number: int) -> None:
    """Discard ``runs`` there, acknowledged (a RoundEnd of no pages): outside the downtime."""
    await _send_discards(sink, runs, number)
    await sink.send(p.RoundEnd(round=number, pages=0))
    await sink.flush()
    ack = await sink.expect_ack(p.Acked.ROUND)
    if ack.round != number:
        raise MigrationFailed(f"destination acknowledged round {ack.round} while discarding for round {number}")


async def discard_ahead(sink: PeerSink, guest: AttachedGuest, dirty: list[Run], number: int,
                        stats: PostcopyStats) -> StalePages:
    """Before the freeze: the pages the last scan found are stale already; the destination drops
    them now, outside the downtime. Then scan again, up to ``SETTLE_SCANS`` times while a scan
    still finds more than ``SETTLE_PAGES`` written pages, dropping the new ones too: the final
    scan inside the downtime then covers only the moments since the last of these. Each scan
    walks only the spans of pages not stale yet (``StalePages.unsent_spans``), and none is
    needed once every page is stale. The count is of the written pages it found, stale already
    or not: the final scan's cost grows with them (measured: 0.2-0.3 us per written page)."""
    stale = StalePages(guest.layout)

    async def drop(runs: list[Run]) -> None:
        if runs:
            await _drop(sink, runs, number)
            stats.discarded_ahead += count_pages(runs)

    fresh = stale.mark(dirty)
    for _ in range(SETTLE_SCANS):
        await drop(fresh)
        spans = stale.unsent_spans()    # writes elsewhere do not matter: those pages are stale
        if not spans:
            return stale
        late = await trio.to_thread.run_sync(guest.tracker.collect, spans)
        fresh = stale.mark(late)
        stats.settle_scans += 1
        if count_pages(late) <= SETTLE_PAGES:
            break
    if count_pages(fresh) <= UNDROPPED_PAGES:
        # few: dropped with the final scan's; dropping them here would let the guest write on
        # through one more round trip, and the final scan grows with what it writes
        stale.undropped = fresh
        return stale
    await drop(fresh)
    return stale


async def switch(guest: AttachedGuest, sink: PeerSink, stale: StalePages, state: Switchover,
                 stats: PostcopyStats) -> None:
    """Freeze, drop what the guest wrote since the last scan and switch; returns once the
    destination is armed (its Ack of the switch)."""
    layout = guest.layout
    stats.guest_rate_before = await trio.to_thread.run_sync(_write_rate, guest)
    # the final scan walks only where pages are not stale yet: a small part of the region after
    # a hybrid's switch in round 0, nothing when every page is stale (a post-copy from the start)
    late, t = await freeze_and_scan(guest, sink, state, within=stale.unsent_spans())
    fresh = union(stale.undropped, stale.mark(late), layout.page_size)
    state.parts["final_scan"] = ms(time.perf_counter() - t)
    state.step = "switch"
    t = time.perf_counter()
    await _send_discards(sink, fresh, state.number)
    stats.stale_pages = stale.count
    state.final_pages = count_pages(fresh)
    await sink.send(p.Switch(round=state.number, pages=stats.stale_pages))
    ack = await sink.expect_ack(p.Acked.SWITCH)
    state.parts["switch"] = ms(time.perf_counter() - t)
    for key, value in ack.timings_ms.items():
        state.parts["dest_" + key] = value
    if not ack.ok:
        raise MigrationFailed(f"destination refused the post-copy switch: {ack.reason or '?'}")


def _write_rate(guest: AttachedGuest) -> float | None:
    """The guest's own writes/s (a migrator guest reports them; another process does not)."""
    try:
        return float(guest.client.stats().get("write_rate"))
    except Exception:  # noqa: BLE001 - only a report figure: any process may be migrated
        return None


class Delivery:
    """After the commit: every stale page exactly once, the destination's requests first."""

    def __init__(self, sink: PeerSink, pages: PageStream, digests: PageDigests, stale: StalePages, number: int,
                 stats: PostcopyStats) -> None:
        pages.sink = sink
        self.pages = pages
        self.digests = digests
        self.layout = pages.layout
        self.number = number
        self.stats = stats
        self.states = stale.states       # STALE -> SENT as pages go
        # the destination acknowledged the page digest: set before any checkpoint, since the
        # receiver may hang up right after, and its EOF can overtake the Ack on the way in
        self.verified = False
        # held from claiming a request's pages until they are written: the page digest, a
        # barrier, must not overtake pages the push skipped because a request claimed them
        self._answering = trio.Lock()
        # requested pages are read into buffers of their own size: taking one of the push's
        # large pooled buffers, or a fresh one when the push holds them all, would fault in
        # megabytes on the request's path
        self._request_buffers = BufferPool(REQUEST_PAGES * self.layout.page_size)
        self._native: NativeRequests | None = None
        self._native_done = trio.Event()
        self._accounted = 0              # of the native loop's bytes, those counted on the channel

    def resume_with(self, sink: PeerSink, lacking: list[Run]) -> None:
        """A new session after a cut: every page the destination lacks is owed again, whether or
        not it was sent before (those sent were lost with the link)."""
        self.pages.sink = sink
        if lacking:
            self.stats.resent_pages += self.states.set(lacking, STALE)

    @property
    def sink(self) -> PeerSink:
        """Where pages go: the stream's sink (a resumed session replaces it)."""
        return self.pages.sink

    @property
    def owed(self) -> int:
        return self.states.count(STALE)

    async def answer_natively(self, nursery: trio.Nursery) -> None:
        """From now on the destination's requests come to a native loop on the urgent link
        (after the switch's barrier, when ``Channel.native_faults``)."""
        sock = await self.sink.channel.take_urgent_socket()
        try:
            self._native = NativeRequests(sock, self.pages.memory, self.states)
        except BaseException:
            os.close(sock)
            raise
        self.stats.native_faults = True
        nursery.start_soon(self._run_native)

    async def _run_native(self) -> None:
        native = self._native
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._account_native, native)
                await native.run()
                nursery.cancel_scope.cancel()
        finally:
            stats = native.statistics()
            self.sink.channel.account_urgent(stats.answered_bytes - self._accounted)
            # whatever ended it: the pages it sent first are the destination's now, or are
            # asked for again by a resumed session, and are hashed again then
            native.record_digests(self.digests)
            self.stats.requests += stats.requests
            self.stats.requested_pages += stats.claimed_pages
            self.stats.duplicate_pages += stats.duplicate_pages
            native.close()
            self._native_done.set()

    async def _account_native(self, native: NativeRequests) -> None:
        """Every ``ACCOUNT_S``, the native loop's bytes since go on the channel's counts and its
        bandwidth cap, so that a cap holds for the requested pages as it does for frames."""
        while True:
            await trio.sleep(ACCOUNT_S)
            answered = native.statistics().answered_bytes
            self.sink.channel.account_urgent(answered - self._accounted)
            self._accounted = answered

    async def run(self) -> None:
        """Push, then the page digest; returns once the destination verified every page. The
        destination's requests are served by ``serve_requests`` or the native loop, running
        beside it; the loop is stopped first (its end record follows its last answer)."""
        await self._push()
        if self._native is not None:
            self._native.stop()
            await self._native_done.wait()
        async with self._answering:
            await self.sink.send(p.RoundEnd(round=self.number, pages=self.stats.stale_pages, final=True))
        await self.sink.send(p.Digest(kind=p.DigestKind.PAGES, value=self.digests.value(), last=True))
        await self.sink.flush()
        ack = await self.sink.expect_ack(p.Acked.DIGEST)
        self.stats.duration_s = time.perf_counter() - self.stats.started
        self.stats.dest = dict(ack.timings_ms)
        if not ack.ok:
            raise MigrationFailed(f"destination's copy failed verification after post-copy: {ack.reason or '?'}")
        self.verified = True

    async def serve_requests(self) -> None:
        """Answer each Request with its pages not sent yet, ahead of the push."""
        ps = self.layout.page_size
        async for request in self.sink.requests:
            async with self._answering:
                asked = list(request.runs)
                try:
                    runs = self.states.claim(asked, STALE, SENT)
                except OSError as exc:
                    raise MigrationFailed(f"destination requested pages outside the guest's layout: {exc}") from None
                self.stats.requests += 1
                # every page asked for goes now, also those the push sent already: they may be in
                # the socket buffers or in the destination's install queue behind megabytes of
                # the push, which the fault would wait for (the destination installs the first
                # copy that comes and skips the other)
                for batch in split_runs(asked, REQUEST_PAGES, MAX_RUNS_PER_EVENT, ps):
                    data = self._read_requested(batch)
                    await self.sink.send(p.Pages(round=self.number, runs=tuple(batch), payload=data), urgent=True)
                claimed = count_pages(runs)
                self.stats.requested_pages += claimed
                self.stats.duplicate_pages += count_pages(asked) - claimed

    async def send_head(self) -> None:
        """Before the commit: the stale pages among the first of the region (a guest's control
        block sits at its start, touched by its first step), so resuming does not wait on a fault."""
        region = self.layout.regions[0]
        async with self._answering:
            runs = self.states.claim([(region.start, min(REQUEST_PAGES, region.length // self.layout.page_size))],
                                     STALE, SENT)
            if runs:
                await self.sink.send(p.Pages(round=self.number, runs=tuple(runs), payload=self._read_requested(runs)))
                self.stats.pushed_pages += count_pages(runs)

    def _read_requested(self, runs: list[Run]) -> memoryview:
        """A few pages, read and hashed on this thread: no thread hop on the request's path."""
        return self.pages.read_chunk(runs, self._request_buffers)[0]

    async def _push(self) -> None:
        """Every stale page not claimed by a request, in address order: each chunk is claimed as
        the stream's reader comes to it (ahead of the sends), so a request meanwhile wins."""

        ps = self.layout.page_size
        whole = [(region.start, region.length // ps) for region in self.layout.regions]

        def claimed():
            for chunk in split_runs(whole, READ_CHUNK_PAGES, MAX_RUNS_PER_EVENT, ps):
                runs = self.states.claim(chunk, STALE, SENT)
                if runs:
                    yield runs

        self.stats.pushed_pages += await self.pages.stream(self.number, claimed(), batch_pages=PUSH_FRAME_PAGES)
        await self.sink.flush()
