"""Finish a post-copy interrupted past its commit, from a new process (``migrate --resume``).

::

    the state file beside the guest's socket: that migration, a post-copy, stopped, untraced
      ─ hash the frozen region ─ connect ─ Resume ─ Layout ─ Lacking ... ─ Ack(resume)
      ─ every lacking page, the destination's requests first ─ RoundEnd(final) ─ Digest
      ─ Ack(digest) ─ terminate the source guest

The migrator that committed recovers a cut link by itself (``SourceMigration._recover``) for as
long as its ``--recover-timeout``; this is for when it did not: recovery was off, it gave up, or
it died (SIGKILL, a crash). Its guest is then stopped for good (``source.freeze``) and, as a
stopped guest answers nothing on its control socket, its state file (``guest.committed``) is
what says which migration froze it, where to, and with which Layout.

Nothing here ever resumes the source guest, and it is killed only after the destination has
acknowledged the page digest, which this side computes from the frozen memory itself: the guest
has not run since its commit, so its memory is what the destination must end up holding. Every
failure leaves the guest frozen for the next attempt.
"""

from __future__ import annotations

import os
import shlex
import signal
import ssl
import time
from dataclasses import dataclass

import trio

from .. import protocol as p
from ..core.deadlines import deadline
from ..core.digest import PageDigests, new_hashes
from ..core.documents import header, utc_now
from ..core.errors import GuestError, MigrationFailed, ResumeRefused, TransportError
from ..core.failures import describe, leaf_exceptions
from ..core.model import MemoryLayout, Region
from ..core.runs import count_pages, split_runs
from ..guest import committed
from ..tracker.memory import ProcessMemory
from .freeze import thread_states, tracer_of
from .pages import READ_CHUNK_PAGES, PageStream
from .postcopy import Delivery, PostcopyStats, StalePages
from .report import MigrationReport, PostcopyReport, ReportSettings
from .sink import PeerSink

RESUME_ANSWER_S = 60.0   # Resume sent to the destination's Ack of it (it lists what it lacks first)
HASH_THREADS = 2         # worker threads hashing the frozen region


@dataclass(frozen=True, slots=True)
class InterruptedPostcopy:
    """A source guest frozen by a post-copy past its commit, as its state file describes it."""

    migration: str           # the migration's id (its reports', the destination's log lines)
    destination: str         # where it committed to
    pid: int
    layout: MemoryLayout     # the Layout it announced, with the guest's pid
    switch_round: int
    committed_unix: float


@dataclass(frozen=True)
class ResumeSettings:
    """How the resumed session reaches the receiver: as ``MigrateSettings``' fields of the same name."""

    token: bytes | None = None
    tls: ssl.SSLContext | None = None
    compress: str = "zstd:1"
    streams: int = 1
    bandwidth: float | None = None
    frame_macs: bool = False
    postcopy_timeout_s: float = 300.0   # delivering the lacking pages and the verdict may take this long
    keep_source: bool = False           # keep the source frozen after the destination verified it


def resume_command(migration: str, guest_control: str, address: str, *, insecure: bool = False,
                   tls: bool = False) -> str:
    """The command line that finishes ``migration``, for its failure line: the token is the
    default one unless ``insecure``; a TLS run's CA option cannot be known here, so it is named."""
    line = f"migrator migrate --resume {migration} --guest {shlex.quote(guest_control)} --to {shlex.quote(address)}"
    return line + (" --insecure" if insecure else "") + (" (and the run's --tls-ca or --tls)" if tls else "")


def find_interrupted(guest_control: str, migration: str | None = None) -> InterruptedPostcopy:
    """The interrupted post-copy of the guest at ``guest_control`` (of ``migration``, if given).
    ResumeRefused, one line, when there is none to finish: no state file, another migration's,
    a pre-copy's, a guest that is not stopped or that a tracer (its migrator, still recovering)
    holds. Reads only: the guest is left as it was."""
    path = committed.state_path(guest_control)
    try:
        record = committed.read_record(guest_control)
    except GuestError as exc:
        raise ResumeRefused(str(exc)) from None
    if record is None:
        raise ResumeRefused(f"no migration committed the guest at {guest_control} (it has no state file {path}): "
                            "there is nothing to resume")
    # the record names its process by pid and start time; the socket is not asked (a stopped
    # guest accepts no connection, and each attempt would stay queued in its backlog)
    pid = record.pid
    if not record.applies_to(pid):
        raise ResumeRefused(f"the state file {path} names guest pid {pid}, which is gone: nothing is left to resume "
                            "from (remove the file)")
    if migration is not None and record.migration != migration:
        raise ResumeRefused(f"guest pid {pid} was committed by migration {record.migration}, not {migration}")
    if not record.postcopy:
        raise ResumeRefused(f"guest pid {pid}: {record.describe()} by a pre-copy, whose destination had every page "
                            "before the commit: there is nothing to resume")
    if not record.regions or not record.page_size:
        raise ResumeRefused(f"the state file {path} does not record the guest's Layout (an older migrator wrote it): "
                            "cannot resume")
    tracer = tracer_of(pid)
    if tracer:
        raise ResumeRefused(f"guest pid {pid} is held by pid {tracer} (the migrator of {record.migration} recovering "
                            "by itself?): wait until it has exited")
    states = thread_states(pid)
    if states != {"T"}:
        raise ResumeRefused(f"guest pid {pid} is not stopped (its threads are in state {','.join(sorted(states)) or '?'})")
    layout = MemoryLayout(pid=pid, page_size=record.page_size,
                          regions=tuple(Region(start, length) for start, length in record.regions))
    return InterruptedPostcopy(migration=record.migration, destination=record.destination, pid=pid, layout=layout,
                               switch_round=record.switch_round, committed_unix=record.committed_unix)


async def hash_frozen(memory, layout: MemoryLayout, digests: PageDigests) -> None:
    """Record every page's digest from the frozen memory: chunks read on worker threads, each
    page hashed in C as it is copied (``PageStream.read_chunk``'s way), none in Python."""
    ps = layout.page_size
    chunks = list(split_runs([(r.start, r.length // ps) for r in layout.regions], READ_CHUNK_PAGES, 1, ps))

    def hash_share(first: int) -> None:
        buffer = memoryview(bytearray(READ_CHUNK_PAGES * ps))
        for chunk in chunks[first::HASH_THREADS]:
            pages = count_pages(chunk)
            hashes = new_hashes(pages)
            memory.read_runs(chunk, buffer[: pages * ps], hashes=hashes)
            digests.record_hashes(layout, chunk, hashes)

    async with trio.open_nursery() as nursery:
        for first in range(HASH_THREADS):
            nursery.start_soon(trio.to_thread.run_sync, hash_share, first)


class ResumedPostcopy:
    """Finish migration ``migration`` of the guest at ``guest_control``, whose destination
    (``address``) waits for its source: ``report = await ResumedPostcopy(...).run()``."""

    def __init__(self, guest_control: str, address: str, migration: str, settings: ResumeSettings = ResumeSettings(),
                 *, log=lambda line: None) -> None:
        self.guest_control = guest_control
        self.address = address
        self.id = migration
        self.settings = settings
        self.log = log
        self.report: MigrationReport | None = None
        self.interrupted: InterruptedPostcopy | None = None
        self.stats = PostcopyStats()
        self._sink: PeerSink | None = None
        self._delivery: Delivery | None = None

    @property
    def verified(self) -> bool:
        """The destination acknowledged the page digest: it holds every page of the frozen source."""
        return self._delivery is not None and self._delivery.verified

    async def run(self) -> MigrationReport:
        """Deliver what the destination lacks and verify; returns the report. ResumeRefused
        when nothing was sent, MigrationFailed(committed=True) otherwise: the guest stays frozen."""
        started, self.started_at = time.perf_counter(), utc_now()
        error: BaseException | None = None
        try:
            await self._run()
        except BaseException as exc:  # noqa: BLE001 - turned into one typed line below
            error = exc
        self.report = self._report(time.perf_counter() - started, error)
        if isinstance(error, ResumeRefused):
            raise error
        if error is not None:
            raise MigrationFailed(self.report.error, committed=True) from error
        return self.report

    async def _run(self) -> None:
        s = self.settings
        target = self.interrupted = await trio.to_thread.run_sync(find_interrupted, self.guest_control, self.id)
        layout = target.layout
        try:
            pidfd = os.pidfd_open(target.pid)
        except ProcessLookupError:
            raise ResumeRefused(f"guest pid {target.pid} exited") from None
        try:
            if await trio.to_thread.run_sync(find_interrupted, self.guest_control, self.id) != target:
                raise ResumeRefused(f"guest pid {target.pid} changed while it was being opened")   # a recycled pid
            memory = ProcessMemory(target.pid, layout.page_size)
            digests = PageDigests(layout.total_pages, layout.page_size)
            try:
                await hash_frozen(memory, layout, digests)
            except OSError as exc:
                raise ResumeRefused(f"cannot read guest pid {target.pid}'s memory ({exc.strerror}): it needs "
                                    "ptrace-read rights over it") from None
            self.log(f"resuming post-copy {self.id} of guest pid {target.pid} at {self.address}")
            try:
                await self._session(memory, layout, digests, target.switch_round)
            except BaseException as exc:
                if not (self.verified and all(isinstance(e, TransportError) for e in leaf_exceptions(exc))):
                    raise           # else the receiver closed the link after its verdict: the end
            self.log(f"post-copy {self.id} verified: {self.stats.resent_pages} pages were lacking there")
            if not s.keep_source:
                await self._terminate(pidfd)
        finally:
            os.close(pidfd)

    async def _session(self, memory, layout: MemoryLayout, digests: PageDigests, number: int) -> None:
        """Resume the session at the receiver and deliver, until it acknowledged the page digest."""
        s = self.settings
        async with PeerSink.open(self.address, token=s.token, compress=s.compress, streams=s.streams,
                                 bandwidth=s.bandwidth, tls=s.tls, frame_macs=s.frame_macs, urgent=True) as sink:
            sink.committed = True       # past the point of no return: never an Abort from here
            self._sink = sink
            with deadline(RESUME_ANSWER_S, "waiting for the destination's answer to Resume"):
                await sink.send(p.Resume(migration=self.id))
                await sink.send(p.Layout(regions=layout.regions, page_size=layout.page_size, meta={"id": self.id}))
                await sink.flush()
                ack = await sink.expect_ack(p.Acked.RESUME)
            if not ack.ok:
                raise MigrationFailed(f"the destination refused to resume migration {self.id}: {ack.reason or '?'}")
            await self._deliver(sink, PageStream(memory, layout, digests, sink), digests, number)

    async def _deliver(self, sink: PeerSink, pages: PageStream, digests: PageDigests, number: int) -> None:
        """Every page the destination lacks (its Lacking runs, read before the Ack), then the digest."""
        stats = self.stats
        delivery = self._delivery = Delivery(sink, pages, digests, StalePages(pages.layout), number, stats)
        delivery.resume_with(sink, sink.lacking)
        stats.stale_pages, stats.recoveries, stats.started = delivery.owed, 1, time.perf_counter()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(delivery.serve_requests)
                with trio.fail_after(self.settings.postcopy_timeout_s):
                    await delivery.run()
                nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            raise MigrationFailed(f"not done after {self.settings.postcopy_timeout_s:g} s (--postcopy-timeout)") from None

    async def _terminate(self, pidfd: int) -> None:
        """Kill the verified source guest (through its pidfd: never a recycled pid) and remove its
        state file: a killed guest never runs again, so nothing waits for its exit (the kernel
        freeing its memory), as after a live migration's commit."""
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        committed.discard_stale(self.guest_control, killed=self.interrupted.pid)

    def _report(self, total_s: float, error: BaseException | None) -> MigrationReport:
        target, s, stats = self.interrupted, self.settings, self.stats
        layout = target.layout if target else None
        text = None
        if error is not None:
            text = describe(error)
            if not isinstance(error, ResumeRefused):
                text += f"; the source guest stays frozen{f' (pid {target.pid})' if target else ''}"
                if target is not None and target.destination != self.address:
                    text += f"; it committed to {target.destination}"
        postcopy = None if self._sink is None else PostcopyReport(
            switch_round=target.switch_round, stale_pages=stats.stale_pages, discarded_ahead=0,
            pushed_pages=stats.pushed_pages, requested_pages=stats.requested_pages, requests=stats.requests,
            duration_s=None if stats.duration_s is None else round(stats.duration_s, 4),
            faults=int(stats.dest["faults"]) if "faults" in stats.dest else None,
            fault_p50_ms=stats.dest.get("fault_p50"), fault_p99_ms=stats.dest.get("fault_p99"),
            fault_max_ms=stats.dest.get("fault_max"), guest_rate_after=stats.dest.get("guest_write_rate"),
            recoveries=stats.recoveries, resent_pages=stats.resent_pages, duplicate_pages=stats.duplicate_pages,
        )
        sent = stats.pushed_pages + stats.requested_pages + stats.duplicate_pages
        return MigrationReport(
            **header(MigrationReport.SCHEMA, id=self.id, peer=self.address, started_at=self.started_at),
            kind="migration",
            settings=ReportSettings(
                downtime_ms=0.0, max_rounds=0, tracker="none", compress=s.compress, streams=s.streams,
                bandwidth=s.bandwidth, verify="pages", tls=s.tls is not None,
                size_bytes=layout.total_bytes if layout else None, pages=layout.total_pages if layout else None,
                frame_macs=self._sink.channel.frame_macs if self._sink is not None else None, mode="resume",
            ),
            rounds=(), result="committed" if error is None else "failed", committed=True, verified=self.verified,
            error=text, total_s=total_s, rule="resume", rule_reason="finished an interrupted post-copy (migrate --resume)",
            bytes_wire=self._sink.statistics().bytes_wire if self._sink is not None else 0,
            pages_sent=sent, bytes_raw=sent * layout.page_size if layout else 0, postcopy=postcopy,
        )
