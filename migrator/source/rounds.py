"""Pre-copy: round 0 sends every page, then rounds of the pages written since, until the policy
says the rest fits the downtime target (or throttles the guest, or gives up waiting).

Each round ends, on a sink that acknowledges, when the destination acknowledges its RoundEnd,
which it sends once every page before it is applied. So a round's time, which the downtime
estimate learns from, includes the destination's work, and no backlog of unapplied pages is
left to slow the final copy inside the downtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from .. import protocol as p
from ..core.deadlines import deadline
from ..core.errors import MigrationFailed
from ..core.model import Run
from ..core.runs import complement, count_pages, split_runs, union
from .attach import AttachedGuest
from .estimator import DowntimeEstimator
from .pages import MAX_RUNS_PER_EVENT, READ_CHUNK_PAGES, PageStream, RoundTimer
from .policy import PROBE_S, Action, Decision, PolicySettings, Rule, decide, outpaced_in_round_zero
from .report import RoundStats
from .sink import HANDSHAKE_TIMEOUT_S, Sink

ZERO_RUNS_PER_EVENT = 8192

FirstScan = Callable[[], tuple[list[Run], list[Run]]]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class Precopy:
    """The rounds of one migration; ``rounds`` holds each finished round's statistics."""

    def __init__(self, guest: AttachedGuest, sink: Sink, pages: PageStream, estimator: DowntimeEstimator,
                 policy: PolicySettings, *, round_timeout_s: float, on_round=None) -> None:
        self.guest = guest
        self.sink = sink
        self.pages = pages
        self.estimator = estimator
        self.policy = policy
        self.round_timeout_s = round_timeout_s
        self.on_round = on_round or (lambda stats: None)
        self.rounds: list[RoundStats] = []
        self.current: RoundTimer | None = None   # the round in progress, read by progress snapshots
        self.throttle = 0.0                      # the duty cycle in force (progress snapshots)
        self.throttle_max = 0.0
        self.rtt_ms: float | None = None
        self._wire_total = 0
        self._compress_total = 0.0
        self._scan_before_s = 0.0                # the scan that found the next round's pages
        self._early: Decision | None = None      # the hybrid's probe ended round 0 early

    async def send_layout(self, meta: dict) -> None:
        """Announce the guest's memory; on a live sink, wait until the destination has its restore
        guest, and take the link's round trip from the exchange (for the report: the estimate's
        fixed part takes the switch-over's exchanges from the rounds' acknowledgements)."""
        layout = self.guest.layout
        t = time.perf_counter()
        await self.sink.send(p.Layout(regions=layout.regions, page_size=layout.page_size, meta=meta))
        await self.sink.flush()
        if not self.sink.acknowledges:
            return
        with deadline(HANDSHAKE_TIMEOUT_S, "waiting for the destination's restore guest"):
            ack = await self.sink.expect_ack(p.Acked.LAYOUT)
        self.rtt_ms = max(0.0, ms(time.perf_counter() - t) - ack.ready_ms)

    def arm_and_scan(self) -> tuple[list[Run], list[Run]]:
        """Worker thread, a first scan from scratch: arm the tracker; every populated page to
        send, and the untouched rest to send as Zero ranges."""
        tracker, layout = self.guest.tracker, self.guest.layout
        tracker.arm()
        populated = tracker.populated()
        return populated, complement(layout.regions, populated, layout.page_size)

    async def run(self, first_scan: FirstScan | None = None) -> tuple[list[Run], Decision]:
        """Round 0 from ``first_scan`` (default ``arm_and_scan``), then rounds until the policy
        switches over (or to post-copy); returns the pages still dirty and the deciding rule.

        Post-copy from the start (``postcopy_after`` 0): round 0 sends only the untouched pages'
        Zero ranges, and every populated page is left dirty for post-copy to deliver."""
        from_start = self.policy.postcopy_after == 0
        with deadline(self.round_timeout_s, "round 0 (--round-timeout)"):
            dirty = await self._round_zero(first_scan or self.arm_and_scan, send_pages=not from_start)
        if from_start:
            return dirty, Decision(Action.POSTCOPY, Rule.POSTCOPY_AFTER, 0.0,
                                   "post-copy from the start (--postcopy): round 0 sent only the untouched pages")
        if self._early is not None:
            return dirty, self._early
        while True:
            decision = decide(self.rounds, self.policy)
            self.throttle_max = max(self.throttle_max, decision.throttle)
            if decision.action in (Action.SWITCHOVER, Action.POSTCOPY):
                return dirty, decision
            if decision.action is Action.THROTTLE:
                self.guest.throttle.set(decision.throttle)
            self.throttle = decision.throttle
            number = len(self.rounds)
            timer = self.current = RoundTimer(number, count_pages(dirty))
            with deadline(self.round_timeout_s, f"round {number} (--round-timeout)"):
                await self.pages.send(timer, dirty)
                dirty = await self._end_round(timer, throttle=decision.throttle)

    async def _round_zero(self, first_scan: FirstScan, *, send_pages: bool = True) -> list[Run]:
        timer = self.current = RoundTimer(0, 0)
        t = time.perf_counter()
        populated, zero = await trio.to_thread.run_sync(first_scan)
        timer.scan_s = time.perf_counter() - t
        timer.zero_pages = count_pages(zero)
        timer.dirty_pages = count_pages(populated) + timer.zero_pages  # round 0 covers every page
        for first in range(0, len(zero), ZERO_RUNS_PER_EVENT):
            await self.sink.send(p.Zero(round=0, runs=tuple(zero[first : first + ZERO_RUNS_PER_EVENT])))
        ps = self.guest.layout.page_size
        if not send_pages:
            timer.dirty_pages = timer.zero_pages
            written = await self._end_round(timer, throttle=0.0)
            return union(populated, written, ps)
        if not self.policy.postcopy_auto:
            await self.pages.send(timer, populated)
            return await self._end_round(timer, throttle=0.0)
        # the hybrid: round 0 for PROBE_S, then a look at the guest's pace (the stream takes its
        # chunks as it goes, so the probe's share is what went by then)
        armed = time.perf_counter()
        chunks = split_runs(populated, READ_CHUNK_PAGES, MAX_RUNS_PER_EVENT, ps)
        head = 0        # pages taken before the probe

        def until_probe():
            nonlocal head
            for chunk in chunks:
                head += count_pages(chunk)
                yield chunk
                if time.perf_counter() - armed >= PROBE_S:
                    return

        await self.pages.stream(0, until_probe(), timer=timer)
        if head == count_pages(populated):      # all of round 0 went before the probe
            return await self._end_round(timer, throttle=0.0)
        written = await trio.to_thread.run_sync(self.guest.tracker.collect)
        self._early = outpaced_in_round_zero(head, count_pages(written), time.perf_counter() - armed, self.policy)
        if self._early is not None:
            timer.dirty_pages = head + timer.zero_pages
            dirty = await self._end_round(timer, throttle=0.0, written_before=written)
            return union([run for chunk in chunks for run in chunk], dirty, ps)
        await self.pages.stream(0, chunks, timer=timer)
        return await self._end_round(timer, throttle=0.0, written_before=written)

    async def _end_round(self, timer: RoundTimer, *, throttle: float, written_before: list[Run] = ()) -> list[Run]:
        """Flush, scan what the guest wrote meanwhile (and ``written_before``, what a scan
        during the round found), and record the round's statistics."""
        t = time.perf_counter()
        await self.sink.send(p.RoundEnd(round=timer.number, pages=timer.dirty_pages))
        await self.sink.flush()
        if self.sink.acknowledges:
            flushed = time.perf_counter()
            ack = await self.sink.expect_ack(p.Acked.ROUND)
            if ack.round != timer.number:
                raise MigrationFailed(f"destination acknowledged round {ack.round} at the end of round {timer.number}")
            timer.exchange_s = time.perf_counter() - flushed
            self.estimator.observe_exchange(timer.exchange_s)
        timer.send_s += time.perf_counter() - t
        duration = time.perf_counter() - timer.started
        t = time.perf_counter()
        dirty = await trio.to_thread.run_sync(self.guest.tracker.collect)
        if written_before:
            dirty = union(written_before, dirty, self.guest.layout.page_size)
        scan_next = time.perf_counter() - t
        left = count_pages(dirty)
        self.estimator.observe_scan(scan_next)
        sent_pages = timer.dirty_pages - timer.zero_pages
        self.estimator.observe(pages=sent_pages, seconds=duration - timer.scan_s, round0=timer.number == 0)
        stats = self.sink.statistics()
        prev_wire, prev_compress = self._wire_total, self._compress_total
        self._wire_total, self._compress_total = stats.bytes_wire, stats.compress_seconds
        round_stats = RoundStats(
            round=timer.number,
            dirty_pages=timer.dirty_pages,
            zero_pages=timer.zero_pages,
            bytes_raw=timer.bytes_raw,
            bytes_wire=stats.bytes_wire - prev_wire,
            scan_s=timer.scan_s if timer.number == 0 else self._scan_before_s,
            read_s=timer.read_s,
            compress_s=stats.compress_seconds - prev_compress,
            send_s=timer.send_s,
            duration_s=duration,
            dirty_rate=left / (duration + scan_next) if duration > 0 else 0.0,
            bandwidth=timer.bytes_raw / duration if duration > 0 else 0.0,
            expected_downtime_ms=self.estimator.expected_ms(left),
            expected_fixed_ms=self.estimator.statistics().fixed_ms,
            throttle=throttle,
            exchange_s=timer.exchange_s,
            pages_left=left,
        )
        self._scan_before_s = scan_next
        self.rounds.append(round_stats)
        self.on_round(round_stats)
        return dirty
