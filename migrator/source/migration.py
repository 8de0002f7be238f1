"""One live migration, seen from the source: attach, pre-copy rounds, switch-over, report.

::

    attach guest ─ connect ─ Layout ─ round 0 (every populated page; untouched pages as Zero)
      └─ rounds: collect written pages ─ policy: continue / throttle / switch over
                                              │
    freeze ─ final collect ─ send the rest ─ Digest ─ Ack ══ COMMIT (point of no return) ─ Ack
      ─ terminate (or keep frozen) the source guest

Each phase has its module: ``attach`` (the guest, its tracker and throttle), ``sink`` (where
pages go), ``pages`` (read and send a round), ``rounds`` (pre-copy and its policy),
``switchover`` (the final copy and the commit), ``report``. This module only composes them.

Before the point of no return any failure thaws the source guest, releases the tracker, tells
the destination to discard its copy (Abort) and raises ``MigrationFailed(committed=False)``.
From the moment Commit is sent the source guest never resumes: if the destination's
acknowledgement does not arrive, the source is kept frozen (not killed) and the failure says the
outcome is unknown.
"""

from __future__ import annotations

import contextlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import trio

from .. import protocol as p
from ..core.documents import utc_now
from ..core.digest import PageDigests
from ..core.documents import to_data
from ..core.errors import MigrationFailed, MigratorError, TransportError
from ..transport.control import Request, control_path, serve_control
from ..core.failures import describe, leaf_exceptions
from ..core.heap import collector_paused
from .attach import AttachedGuest
from .estimator import DowntimeEstimator, switchover_fixed_ms
from .pages import PageStream
from .policy import Action, PolicySettings
from .postcopy import Delivery, PostcopyStats, discard_ahead, switch
from .progress import Progress, Sampler
from .report import MigrationReport, PostcopyReport, RoundStats, report_of
from .resume import resume_command
from .rounds import Precopy, ms
from .sink import PeerSink
from .switchover import Switchover, bounded, commit, cross_point_of_no_return, final_copy, switchover_deadline_s

RECONNECT_PAUSE_S = 0.2  # between attempts to reach the destination again (post-copy recovery)
WATCH_BUFFER = 64        # snapshots buffered for each ``watch`` reader (13 s of them)


def _lost_link(error: BaseException) -> bool:
    """Whether a lost or broken connection is behind ``error`` (groups and causes searched)."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, TransportError):
            return True
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                stack.append(nxt)
    return False


@dataclass(frozen=True)
class MigrateSettings:
    downtime_ms: float = 50.0
    max_rounds: int = 30
    bandwidth: float | None = None      # bytes/s cap on the link, None = unlimited
    compress: str = "zstd:1"
    streams: int = 1
    tracker: str = "wp-async"
    verify: str = "pages"               # "pages" or "full"
    force_switchover: bool = False
    switch_asap: bool = False           # switch as soon as the target is met (no settling rounds)
    keep_source: bool = False
    token: bytes | None = None
    round_timeout_s: float = 300.0
    switchover_timeout_s: float | None = None  # None: derived from the target (switchover_deadline_s)
    tls: ssl.SSLContext | None = None   # a client context (transport.client_context): TLS links
    frame_macs: bool = False            # MACs on every frame, even on a link that looks protected
    postcopy_after: int | None = None   # post-copy after this many pre-copy rounds (0: --postcopy)
    postcopy_auto: bool = False         # post-copy instead of auto-converge once pre-copy stalls
    postcopy_timeout_s: float = 300.0   # how long delivering the stale pages after the switch may take
    recover_timeout_s: float = 30.0     # a post-copy whose link broke reconnects for this long (0: never)

    def __post_init__(self) -> None:
        if self.verify not in ("pages", "full"):
            raise ValueError(f"verify must be 'pages' or 'full', not {self.verify!r}")
        if self.postcopy and self.verify == "full":
            raise MigratorError("--verify full compares frozen regions; with post-copy the destination's guest runs "
                             "before its last page arrives (use --verify pages)")
        if self.postcopy_after is not None and self.postcopy_after < 0:
            raise MigratorError("postcopy_after must be >= 0")
        if self.downtime_ms <= 0 or self.max_rounds < 1 or self.streams < 1:
            raise ValueError("downtime_ms, max_rounds and streams must be positive")
        if self.switchover_timeout_s is not None and not self.switchover_timeout_s > 0:
            raise ValueError("switchover_timeout_s must be positive")

    @property
    def postcopy(self) -> bool:
        """Whether this run may switch to post-copy."""
        return self.postcopy_after is not None or self.postcopy_auto

    @property
    def mode(self) -> str:
        if self.postcopy_after == 0:
            return "postcopy"
        return "hybrid" if self.postcopy else "precopy"

    def policy(self) -> PolicySettings:
        return PolicySettings(downtime_ms=self.downtime_ms, max_rounds=self.max_rounds,
                              force_switchover=self.force_switchover, postcopy_after=self.postcopy_after,
                              postcopy_auto=self.postcopy_auto, settle=not self.switch_asap)


class SourceMigration:
    """Migrate the guest behind control socket ``guest_control`` to ``address``."""

    def __init__(self, guest_control: str, address: str, settings: MigrateSettings, *, on_round=None,
                 on_progress: Callable[[Progress], None] | None = None, control: bool | str = False) -> None:
        """``on_round(RoundStats)`` is called as each round ends; ``on_progress(Progress)`` with a
        snapshot several times a second, one per ended round (``settled``) and a last one.
        ``control`` opens a control socket (``migrator status|cancel|set``) while it runs: at
        that path, or with True in the user's control directory (``transport.control``)."""
        self.guest_control = guest_control
        self.address = address
        self.settings = settings
        self.on_round = on_round
        self.on_progress = on_progress
        self.id = uuid.uuid4().hex
        self.control_path = (control_path(f"migrate-{self.id[:12]}") if control is True else control) or None
        self.sampler: Sampler | None = None
        self.latest: Progress | None = None
        self._pending: dict = {}
        self._cancel = trio.CancelScope()
        self._watchers: list[trio.MemorySendChannel] = []
        self.id = uuid.uuid4().hex
        self.report: MigrationReport | None = None
        self._guest: AttachedGuest | None = None
        self._precopy: Precopy | None = None
        self._switchover: Switchover | None = None
        self._sink: PeerSink | None = None
        self._rule = ("", "")
        self._postcopy: PostcopyStats | None = None
        self._delivery: Delivery | None = None

    async def run(self) -> MigrationReport:
        """Migrate; returns the report. Raises MigrationFailed with one line saying why."""
        started = time.perf_counter()
        self.started_at = utc_now()
        self.sampler = Sampler(self, self._publish)
        error: BaseException | None = None
        async with trio.open_nursery() as teardown:   # what nothing waits for: a shared guest's unmap
            try:
                async with AttachedGuest(self.guest_control, self.settings.tracker, teardown=teardown) as guest:
                    self._guest = guest
                    await self._migrate_watched(guest)
            except BaseException as exc:  # noqa: BLE001 - turned into one typed line below
                error = exc
            self.report = self._report(time.perf_counter() - started, error)
            self.sampler.ended("committed" if error is None else "failed")
            for watcher in self._watchers:
                watcher.close()
        if error is not None:
            raise MigrationFailed(self.report.error, committed=self.committed) from error
        return self.report

    @property
    def committed(self) -> bool:
        return self._sink is not None and self._sink.committed

    # --- watching and steering it while it runs ------------------------------------------------

    def _publish(self, progress: Progress) -> None:
        self.latest = progress
        if self.on_progress is not None:
            self.on_progress(progress)
        for watcher in self._watchers:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                watcher.send_nowait(progress)

    async def watch(self) -> AsyncIterator[Progress]:
        """The progress snapshots from now until the migration ends, the last one included. A
        reader more than ``WATCH_BUFFER`` snapshots behind misses the ones that did not fit."""
        send, receive = trio.open_memory_channel(WATCH_BUFFER)
        self._watchers.append(send)
        try:
            async with receive:
                async for progress in receive:
                    yield progress
                    if progress.phase in ("committed", "failed"):
                        return
        finally:
            self._watchers.remove(send)

    def cancel(self) -> None:
        """End the migration before the point of no return: the source resumes, the destination
        discards its copy. MigratorError once the switch-over has begun (too late to be safe)."""
        if self._switchover is not None or self.committed:
            raise MigratorError("the switch-over has begun: too late to cancel")
        self._cancelled = True
        self._cancel.cancel()

    def set_parameters(self, *, bandwidth: float | None | str = "unchanged", downtime_ms: float | None = None,
                       max_rounds: int | None = None) -> dict:
        """Change the link's cap (bytes/s, None: uncapped), the downtime target or the round limit;
        they take effect when the round in progress ends. Returns what will change."""
        change: dict = {}
        if bandwidth != "unchanged":
            if bandwidth is not None and not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
                raise MigratorError(f"bandwidth must be a positive number of bytes/s or unlimited, not {bandwidth!r}")
            change["bandwidth"] = None if bandwidth is None else float(bandwidth)
        if downtime_ms is not None:
            if not downtime_ms > 0:
                raise MigratorError(f"downtime-ms must be positive, not {downtime_ms!r}")
            change["downtime_ms"] = float(downtime_ms)
        if max_rounds is not None:
            if max_rounds < 1:
                raise MigratorError(f"max-rounds must be at least 1, not {max_rounds!r}")
            change["max_rounds"] = int(max_rounds)
        if self._switchover is not None or self.committed:
            raise MigratorError("the switch-over has begun: nothing left to change")
        self._pending.update(change)
        return change

    def _apply_pending(self) -> None:
        """At a round's end: the parameters set meanwhile take effect for the next round."""
        change, self._pending = self._pending, {}
        if not change:
            return
        self.settings = replace(self.settings, **change)
        if self._precopy is not None:
            self._precopy.policy = self.settings.policy()
        if "bandwidth" in change:
            if self._precopy is not None:
                self._precopy.estimator.set_bandwidth(change["bandwidth"], self._precopy.guest.layout.page_size)
            if self._sink is not None:
                self._sink.channel.set_bandwidth(change["bandwidth"])

    def _control(self, request: Request) -> dict:
        """Answer one control socket request (``transport.control``)."""
        if request.op == "status":
            progress = self.latest or self.sampler.snapshot()
            s = self.settings
            return {"status": to_data(progress), "parameters": {
                "bandwidth": s.bandwidth, "downtime_ms": s.downtime_ms, "max_rounds": s.max_rounds},
                "pending": dict(self._pending)}
        if request.op == "cancel":
            self.cancel()
            return {"cancelled": True}
        bandwidth = "unchanged" if request.bandwidth is None else None if request.bandwidth == "unlimited" else request.bandwidth
        return {"pending": self.set_parameters(bandwidth=bandwidth, downtime_ms=request.downtime_ms,
                                               max_rounds=request.max_rounds), "takes_effect": "at the next round"}

    async def _migrate_watched(self, guest: AttachedGuest) -> None:
        """``_migrate``, with the sampler publishing progress and the control socket beside it."""
        self._cancelled = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sampler.run)
            if self.control_path is not None:
                await nursery.start(serve_control, self.control_path, self._control)
            try:
                with self._cancel:
                    await self._migrate(guest)
                if self._cancelled:
                    raise MigrationFailed("cancelled (migrator cancel)")
            finally:
                nursery.cancel_scope.cancel()

    def _round_ended(self, stats: RoundStats) -> None:
        if self.on_round is not None:
            self.on_round(stats)
        self.sampler.round_ended(stats)
        self._apply_pending()

    async def _migrate(self, guest: AttachedGuest) -> None:
        try:
            await self._migrate_once(guest)
        except BaseException as exc:
            if self._closed_after_verdict(exc):
                self._switchover.verified = True
            elif self._recoverable(exc):
                await self._recover(guest, exc)
            else:
                raise
        if not self.settings.keep_source:
            guest.terminate()

    def _closed_after_verdict(self, error: BaseException) -> bool:
        """The receiver hung up once it had verified every post-copy page: the end, not a failure."""
        return (self._delivery is not None and self._delivery.verified
                and all(isinstance(e, TransportError) for e in leaf_exceptions(error)))

    def _recoverable(self, error: BaseException) -> bool:
        """A post-copy past its commit that lost its link (not a refusal, not a timeout)."""
        return (self._delivery is not None and self.committed and not self._switchover.verified
                and self.settings.recover_timeout_s > 0 and _lost_link(error))

    async def _recover(self, guest: AttachedGuest, lost: BaseException) -> None:
        """Reconnect until ``recover_timeout_s`` has passed, and finish the post-copy over the new
        session: the destination lists what it lacks, and each of those pages is sent again."""
        s, layout, delivery = self.settings, guest.layout, self._delivery
        deadline = trio.current_time() + s.recover_timeout_s
        last = lost
        while trio.current_time() < deadline:
            try:
                with trio.fail_after(max(deadline - trio.current_time(), 0.01)):
                    async with PeerSink.open(self.address, token=s.token, compress=s.compress, streams=s.streams,
                                             bandwidth=s.bandwidth, tls=s.tls, frame_macs=s.frame_macs,
                                             urgent=True) as sink:
                        sink.committed = True      # past the point of no return: never an Abort from here
                        self._sink = sink
                        await sink.send(p.Resume(migration=self.id))
                        await sink.send(p.Layout(regions=layout.regions, page_size=layout.page_size,
                                                 meta={"id": self.id}))
                        await sink.flush()
                        ack = await sink.expect_ack(p.Acked.RESUME)
                        if not ack.ok:
                            raise MigrationFailed(f"the destination refused to resume: {ack.reason}")
                        delivery.resume_with(sink, sink.lacking)
                        self._postcopy.recoveries += 1
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(delivery.serve_requests)
                            with trio.fail_after(s.postcopy_timeout_s):
                                await delivery.run()
                            nursery.cancel_scope.cancel()
                self._switchover.verified = True
                return
            except BaseException as exc:
                if self._closed_after_verdict(exc):
                    self._switchover.verified = True
                    return
                if not _lost_link(exc) or isinstance(exc, trio.TooSlowError):
                    raise
                last = exc
            await trio.sleep(RECONNECT_PAUSE_S)
        raise MigrationFailed(f"the link broke ({describe(lost)}) and did not come back within "
                              f"{s.recover_timeout_s:g} s (--recover-timeout; last: {describe(last)})")

    async def _migrate_once(self, guest: AttachedGuest) -> None:
        s, layout = self.settings, guest.layout
        async with PeerSink.open(self.address, token=s.token, compress=s.compress, streams=s.streams,
                                 bandwidth=s.bandwidth, tls=s.tls, frame_macs=s.frame_macs,
                                 urgent=s.postcopy) as sink:
            self._sink = sink
            if s.postcopy and p.POSTCOPY_FEATURE not in sink.channel.peer.features:
                raise MigrationFailed(f"the receiver at {self.address} does not offer post-copy: upgrade it, "
                                      "or migrate without --postcopy/--postcopy-after")
            digests = PageDigests(layout.total_pages, layout.page_size)
            estimator = DowntimeEstimator(fixed_ms=switchover_fixed_ms(layout.total_bytes),
                                          page_size=layout.page_size, bandwidth=s.bandwidth)
            pages = PageStream(guest.memory, layout, digests, sink)
            precopy = self._precopy = Precopy(guest, sink, pages, estimator, s.policy(),
                                              round_timeout_s=s.round_timeout_s, on_round=self._round_ended)
            await precopy.send_layout({"id": self.id, "tracker": s.tracker, "size": layout.total_bytes})
            # every scan resets what "written" means: a checkpoint taken later must know who
            # scanned last (see migrator.checkpoint)
            await guest.set_tag(f"migration:{self.id}")
            dirty, decision = await precopy.run()
            self._rule = (str(decision.rule), decision.reason)
            if decision.action is Action.POSTCOPY:
                await self._postcopy_phase(guest, sink, pages, digests, dirty)
                return
            state = self._switchover = Switchover(number=len(precopy.rounds))
            limit = s.switchover_timeout_s or switchover_deadline_s(s.downtime_ms, verify=s.verify,
                                                                     region_bytes=layout.total_bytes)
            with bounded(state, limit), collector_paused():   # no collection inside the downtime
                sent_at = await final_copy(guest, sink, pages, digests, dirty, state, verify=s.verify)
                try:
                    await commit(sink, guest, state, sent_at, migration=self.id, destination=self.address)
                finally:
                    guest.committed = guest.committed or sink.committed

    async def _postcopy_phase(self, guest: AttachedGuest, sink: PeerSink, pages: PageStream, digests: PageDigests,
                              dirty: list) -> None:
        """Switch to post-copy (``source.postcopy``) and deliver every stale page."""
        s, number = self.settings, len(self._precopy.rounds)
        stats = self._postcopy = PostcopyStats()
        with trio.fail_after(s.round_timeout_s):
            stale = await discard_ahead(sink, guest, dirty, number, stats)
        state = self._switchover = Switchover(number=number)
        limit = s.switchover_timeout_s or switchover_deadline_s(s.downtime_ms, verify=s.verify,
                                                                 region_bytes=guest.layout.total_bytes)
        try:
            async with trio.open_nursery() as nursery:
                with bounded(state, limit), collector_paused():
                    try:
                        await switch(guest, sink, stale, state, stats)
                        t = time.perf_counter()
                        delivery = self._delivery = Delivery(sink, pages, digests, stale, number, stats)
                        nursery.start_soon(delivery.serve_requests)
                        if sink.channel.native_faults:
                            await delivery.answer_natively(nursery)
                        await delivery.send_head()
                        state.parts["head"] = ms(time.perf_counter() - t)
                        # resuming, the guest may touch a stale page: requests are served from here on
                        await cross_point_of_no_return(sink, guest, state, migration=self.id, destination=self.address,
                                                       postcopy=True)
                        stats.started = time.perf_counter()
                    finally:
                        guest.committed = guest.committed or sink.committed
                with trio.fail_after(s.postcopy_timeout_s):
                    await delivery.run()
                nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            raise MigrationFailed(f"not done after {s.postcopy_timeout_s:g} s (--postcopy-timeout)") from None
        state.verified = True

    def _describe(self, error: BaseException) -> str:
        """One line for a failure; after a post-copy commit it also says what was left where, and
        the command that finishes the migration from here."""
        text, delivery = describe(error), self._delivery
        if delivery is None or not self.committed or self._switchover.verified:
            return text
        s = self.settings
        command = resume_command(self.id, self.guest_control, self.address, insecure=s.token is None,
                                 tls=s.tls is not None)
        return (f"post-copy interrupted with {delivery.owed} of {delivery.stats.stale_pages} stale pages never sent: "
                f"{text}; the source guest stays frozen (pid {self._guest.layout.pid}), the destination's guest "
                f"waits on its missing pages; finish it (while the receiver waits, its --recover-timeout) with: "
                f"{command}")

    def _postcopy_report(self) -> PostcopyReport | None:
        stats = self._postcopy
        if stats is None or self._switchover is None:
            return None
        dest = stats.dest
        return PostcopyReport(
            switch_round=self._switchover.number, stale_pages=stats.stale_pages,
            discarded_ahead=stats.discarded_ahead, pushed_pages=stats.pushed_pages,
            requested_pages=stats.requested_pages, requests=stats.requests,
            duration_s=None if stats.duration_s is None else round(stats.duration_s, 4),
            faults=int(dest["faults"]) if "faults" in dest else None,
            fault_p50_ms=dest.get("fault_p50"), fault_p99_ms=dest.get("fault_p99"), fault_max_ms=dest.get("fault_max"),
            guest_rate_before=stats.guest_rate_before, guest_rate_after=dest.get("guest_write_rate"),
            recoveries=stats.recoveries, resent_pages=stats.resent_pages, duplicate_pages=stats.duplicate_pages,
            native_faults=stats.native_faults,
        )

    def _report(self, total_s: float, error: BaseException | None) -> MigrationReport:
        guest = self._guest
        return report_of(
            self.settings, layout=getattr(guest, "layout", None), precopy=self._precopy, switchover=self._switchover,
            wire_bytes=self._sink.statistics().bytes_wire if self._sink else 0, rule=self._rule,
            error=None if error is None else self._describe(error), total_s=total_s,
            result="committed" if error is None else "failed", committed=self.committed,
            tls=self.settings.tls is not None, id=self.id, peer=self.address, started_at=self.started_at,
            control=self.control_path,
            frame_macs=self._sink.channel.frame_macs if self._sink is not None else None,
            postcopy=self._postcopy_report(), mode=self.settings.mode,
        )
