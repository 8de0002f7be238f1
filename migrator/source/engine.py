"""The pre-copy engine: rounds until the dirty set converges, stop-and-copy, verify, commit.

One migration, seen from the source::

    attach guest ─ arm tracker ─ round 0 (every populated page; untouched pages as Zero ranges)
      └─ loop: collect written pages ─ policy: continue / throttle / switch over
                                              │
    freeze ─ final collect ─ send the rest ─ Digest ─ Ack ══ COMMIT (point of no return) ─ Ack
      ─ terminate (or keep frozen) the source guest

Before the point of no return any failure thaws the source guest, releases the tracker, tells the
destination to discard its copy (Abort) and raises ``MigrationFailed(committed=False)``. From the
moment Commit is sent the source guest never resumes: if the destination's acknowledgement does
not arrive, the source is kept frozen (not killed) and the failure says the outcome is unknown.

Reading, compressing and sending overlap: a reader task feeds a bounded channel and the
transport compresses in worker threads, so a slow link slows the scanner rather than filling
memory.
"""

from __future__ import annotations

import os
import signal
import ssl
import time
import uuid
from dataclasses import asdict, dataclass, field

import trio

from .. import protocol as p
from ..core.buffers import BufferPool
from ..core.deadlines import deadline
from ..core.digest import PageDigests, region_digest, region_digest_read
from ..core.errors import MigrationFailed, MigratorError
from ..core.failures import describe
from ..guest.client import GuestClient
from ..core.model import Layout, RoundStats, Run
from ..core.runs import complement, count_pages, split_runs, union
from ..tracker import open_tracker, required_uffd_mode
from ..tracker.memory import MemfdMemory, ProcessMemory
from ..transport import connect
from .estimator import DowntimeEstimator
from .policy import Action, PolicySettings, decide
from .throttle import Throttle

BATCH_PAGES = 1024       # pages per Pages event (4 MiB raw): one frame, one compression job; 4x fewer
                         # frames than 1 MiB cut the per-frame work of both ends (scripts/bench_transport.py)
READ_CHUNK_PAGES = 1024  # pages read per worker-thread call: one event's worth, about what L2 holds
MAX_RUNS_PER_EVENT = 1024  # IOV_MAX: one process_vm_readv per Pages event at most
ZERO_RUNS_PER_EVENT = 8192
DIGEST_CHUNK = 1 << 20   # bytes per read while hashing the frozen region (--verify full)
HANDSHAKE_TIMEOUT_S = 30.0
# The switch-over's fixed part, measured on the 2-vCPU test machine with a 1 GiB guest (four
# runs): freezing (0.5 ms), the final scan (1.2-1.8), the Digest exchange with the tail of the
# destination's apply queue (5-11) and the commit exchange (1-3): 9-14 ms together. Plus the
# destination guest's shallow self-check, which visits every page header (15-20 ms per GiB).
SWITCHOVER_FIXED_MS = 10.0
SWITCHOVER_ROUND_TRIPS = 2  # Digest -> Ack and Commit -> Ack cross the link inside the downtime
DEST_CHECK_MS_PER_GIB = 20.0


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
    keep_source: bool = False
    token: bytes | None = None
    round_timeout_s: float = 300.0
    tls: ssl.SSLContext | None = None   # a client context (transport.client_context): TLS links

    def __post_init__(self) -> None:
        if self.verify not in ("pages", "full"):
            raise ValueError(f"verify must be 'pages' or 'full', not {self.verify!r}")
        if self.downtime_ms <= 0 or self.max_rounds < 1 or self.streams < 1:
            raise ValueError("downtime_ms, max_rounds and streams must be positive")


def attach_mode(tracker: str) -> str:
    """What a guest's ``attach`` must ask for so that ``tracker`` can run."""
    mode = required_uffd_mode(tracker)
    return {"async": "wp-async", "sync": "sync-wp", None: "none"}[mode]


@dataclass
class _Round:
    """Timers of the round in progress (mutable scratch, frozen into RoundStats at its end)."""

    number: int
    dirty_pages: int
    started: float = field(default_factory=time.perf_counter)
    scan_s: float = 0.0
    read_s: float = 0.0
    send_s: float = 0.0
    zero_pages: int = 0
    bytes_raw: int = 0


class SourceMigration:
    """Migrate the guest behind control socket ``guest_control`` to ``address``."""

    # Each pre-copy round ends when the destination acknowledges its RoundEnd, sent once every
    # page before it is applied. So a round's time, which the downtime estimate learns from,
    # includes the destination's work, and no backlog of unapplied pages is left to slow the
    # final copy inside the downtime.
    ACKS_ROUNDS = True

    def __init__(self, guest_control: str, address: str, settings: MigrateSettings, *, on_round=None) -> None:
        self.guest_control = guest_control
        self.address = address
        self.settings = settings
        self.on_round = on_round or (lambda stats: None)
        self.id = uuid.uuid4().hex
        self.rounds: list[RoundStats] = []
        self.parts: dict[str, float] = {}
        self.committed = False
        self.rule = ""
        self.rule_reason = ""
        self.verified = False
        self.throttle_max = 0.0
        self.rtt_ms: float | None = None
        self._wire_total = 0
        self._compress_total = 0.0
        self._acks: tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel] = trio.open_memory_channel(4)

    # --- public ------------------------------------------------------------------------------

    async def run(self) -> dict:
        """Migrate; returns the report. Raises MigrationFailed with one line saying why."""
        started = time.perf_counter()
        s = self.settings
        self.client = await trio.to_thread.run_sync(GuestClient, self.guest_control)
        try:
            attachment = await trio.to_thread.run_sync(self.client.attach, attach_mode(s.tracker))
        except BaseException:
            self.client.close()
            raise
        self.layout: Layout = attachment.layout
        self.memory = (
            MemfdMemory(attachment.memfd, self.layout.regions, self.layout.page_size)
            if attachment.memfd is not None
            else ProcessMemory(self.layout.pid, self.layout.page_size)
        )
        self.digests = PageDigests(self.layout.total_pages, self.layout.page_size)
        self.buffers = BufferPool(READ_CHUNK_PAGES * self.layout.page_size)
        fixed_ms = SWITCHOVER_FIXED_MS + DEST_CHECK_MS_PER_GIB * self.layout.total_bytes / (1 << 30)
        self.estimator = DowntimeEstimator(fixed_ms=fixed_ms, page_size=self.layout.page_size, bandwidth=s.bandwidth)
        error: BaseException | None = None
        try:
            self.tracker = open_tracker(
                s.tracker, pid=self.layout.pid, regions=self.layout.regions, uffd=attachment.uffd,
                page_size=self.layout.page_size,
            )
            self.throttle = Throttle(self.layout.pid)
            try:
                await self._run_connected()
            finally:
                if not self.committed:
                    self.throttle.thaw()
                self.throttle.close()  # leaves the guest running unless it is frozen for good
                await trio.to_thread.run_sync(self.tracker.close)
        except BaseException as exc:  # noqa: BLE001 - turned into one typed line below
            error = exc
        finally:
            self.client.close()
            if isinstance(self.memory, MemfdMemory):
                self.memory.close()
        report = self.report = self._report(time.perf_counter() - started, error)
        if error is not None:
            raise MigrationFailed(report["error"], committed=self.committed) from error
        return report

    # --- phases ------------------------------------------------------------------------------

    async def _run_connected(self) -> None:
        with deadline(HANDSHAKE_TIMEOUT_S, f"connecting to {self.address} (handshake)"):
            self.channel = await self._open_channel()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_peer)
                try:
                    await self._migrate()
                except BaseException:
                    if not self.committed:
                        with trio.move_on_after(2, shield=True):
                            await self._send_abort("source failed")
                    raise
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(5, shield=True):
                await self.channel.aclose()

    async def _open_channel(self):
        """The session the stream goes to (a checkpoint opens an image file instead)."""
        s = self.settings
        return await connect(self.address, token=s.token, compress=s.compress, streams=s.streams, bandwidth=s.bandwidth,
                             tls=s.tls)

    def _layout_meta(self) -> dict:
        s = self.settings
        return {"id": self.id, "tracker": s.tracker, "size": self.layout.total_bytes}

    def _scan_tag(self) -> str:
        """Recorded in the guest before the first scan: every scan resets what "written" means, so
        a checkpoint taken later must know who scanned last (see migrator.checkpoint)."""
        return f"migration:{self.id}"

    async def _send_abort(self, reason: str) -> None:
        try:
            await self.channel.send(p.Abort(reason=reason))
            await self.channel.flush()
        except (MigratorError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone already: it discards its copy on EOF

    async def _watch_peer(self) -> None:
        """Read what the destination says; an Abort ends the migration (before commit)."""
        send_acks, _ = self._acks
        while True:
            event = await self.channel.receive()
            if isinstance(event, p.Abort):
                raise MigrationFailed(f"destination aborted: {event.reason}")
            await send_acks.send(event)

    async def _expect_ack(self, of: str) -> p.Ack:
        _, acks = self._acks
        while True:
            event = await acks.receive()
            if isinstance(event, p.Ack) and event.of == of:
                return event
            if isinstance(event, p.Digest):
                self.dest_digest = event
                continue
            raise MigrationFailed(f"destination sent {type(event).__name__} while {of} was awaited")

    async def _migrate(self) -> None:
        s = self.settings
        t = time.perf_counter()
        await self.channel.send(
            p.Layout(regions=self.layout.regions, page_size=self.layout.page_size, meta=self._layout_meta())
        )
        await self.channel.flush()
        if self.ACKS_ROUNDS:
            await self._destination_ready(t)
        await trio.to_thread.run_sync(self.client.set_tag, self._scan_tag())
        policy = PolicySettings(
            downtime_ms=s.downtime_ms, max_rounds=s.max_rounds, force_switchover=s.force_switchover
        )
        with deadline(s.round_timeout_s, "round 0 (--round-timeout)"):
            dirty = await self._round_zero()
        while True:
            decision = decide(self.rounds, policy)
            self.throttle_max = max(self.throttle_max, decision.throttle)
            if decision.action is Action.SWITCHOVER:
                self.rule, self.rule_reason = decision.rule, decision.reason
                break
            if decision.action is Action.THROTTLE:
                self.throttle.set(decision.throttle)
            dirty = await self._round(len(self.rounds), dirty, throttle=decision.throttle)
        await self._stop_and_copy(dirty)

    async def _destination_ready(self, sent_at: float) -> None:
        """Wait until the destination has its restore guest, and take the link's round trip from
        the exchange: the switch-over makes two more (Digest -> Ack, Commit -> Ack)."""
        with deadline(HANDSHAKE_TIMEOUT_S, "waiting for the destination's restore guest"):
            ack = await self._expect_ack("layout")
        ready_ms = ack.detail.get("ready_ms")
        ready_ms = ready_ms if isinstance(ready_ms, (int, float)) and ready_ms >= 0 else 0.0
        self.rtt_ms = max(0.0, _ms(time.perf_counter() - sent_at) - ready_ms)
        self.estimator.add_fixed(SWITCHOVER_ROUND_TRIPS * self.rtt_ms)

    async def _round_zero(self) -> list[Run]:
        r = _Round(0, 0)
        t = time.perf_counter()
        populated, zero = await trio.to_thread.run_sync(self._first_scan)
        r.scan_s = time.perf_counter() - t
        r.zero_pages = count_pages(zero)
        r.dirty_pages = count_pages(populated) + r.zero_pages  # round 0 covers every page
        for first in range(0, len(zero), ZERO_RUNS_PER_EVENT):
            await self.channel.send(p.Zero(round=0, runs=tuple(zero[first : first + ZERO_RUNS_PER_EVENT])))
        await self._send_pages(r, populated)
        return await self._end_round(r, throttle=0.0)

    def _first_scan(self) -> tuple[list[Run], list[Run]]:
        """Worker thread: arm the tracker; round 0's pages to send, and those to send as Zero."""
        self.tracker.arm()
        populated = self.tracker.populated()
        return populated, complement(self.layout.regions, populated, self.layout.page_size)

    async def _round(self, number: int, dirty: list[Run], *, throttle: float) -> list[Run]:
        r = _Round(number, count_pages(dirty))
        with deadline(self.settings.round_timeout_s, f"round {number} (--round-timeout)"):
            await self._send_pages(r, dirty)
            return await self._end_round(r, throttle=throttle)

    async def _end_round(self, r: _Round, *, throttle: float) -> list[Run]:
        """Flush, scan what the guest wrote meanwhile, and record the round's statistics."""
        t = time.perf_counter()
        await self.channel.send(p.RoundEnd(round=r.number, stats={"pages": r.dirty_pages}))
        await self.channel.flush()
        if self.ACKS_ROUNDS:
            await self._expect_ack("round")
        r.send_s += time.perf_counter() - t
        duration = time.perf_counter() - r.started
        t = time.perf_counter()
        dirty = await trio.to_thread.run_sync(self.tracker.collect)
        scan_next = time.perf_counter() - t
        sent_pages = r.dirty_pages - r.zero_pages
        self.estimator.observe(pages=sent_pages, seconds=duration - r.scan_s, round0=r.number == 0)
        stats = self.channel.statistics()
        prev_wire, prev_compress = self._wire_total, self._compress_total
        self._wire_total, self._compress_total = stats.bytes_wire, stats.compress_seconds
        round_stats = RoundStats(
            round=r.number,
            dirty_pages=r.dirty_pages,
            zero_pages=r.zero_pages,
            bytes_raw=r.bytes_raw,
            bytes_wire=stats.bytes_wire - prev_wire,
            scan_s=r.scan_s,
            read_s=r.read_s,
            compress_s=stats.compress_seconds - prev_compress,
            send_s=r.send_s,
            duration_s=duration,
            dirty_rate=count_pages(dirty) / (duration + scan_next) if duration > 0 else 0.0,
            bandwidth=r.bytes_raw / duration if duration > 0 else 0.0,
            expected_downtime_ms=self.estimator.expected_ms(count_pages(dirty)),
            throttle=throttle,
        )
        self.rounds.append(round_stats)
        self.on_round(round_stats)
        return dirty

    async def _send_pages(self, r: _Round, runs: list[Run]) -> None:
        """Read ``runs`` in chunks on a worker thread and send them as Pages events, overlapped."""
        send_chunks, recv_chunks = trio.open_memory_channel(2)
        ps = self.layout.page_size

        def read_chunk(chunk: list[Run]):
            t = time.perf_counter()
            data = memoryview(self.buffers.take())[: count_pages(chunk) * ps]
            self.memory.read_runs(chunk, data)
            self.digests.record(self.layout.page_indices(chunk), data)
            return data, time.perf_counter() - t

        async def reader() -> None:
            async with send_chunks:
                for chunk in split_runs(runs, READ_CHUNK_PAGES, 1 << 30, ps):
                    data, seconds = await trio.to_thread.run_sync(read_chunk, chunk)
                    r.read_s += seconds
                    await send_chunks.send((chunk, data))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with recv_chunks:
                async for chunk, view in recv_chunks:
                    offset = 0
                    for batch in split_runs(chunk, BATCH_PAGES, MAX_RUNS_PER_EVENT, ps):
                        size = count_pages(batch) * ps
                        t = time.perf_counter()
                        await self.channel.send(
                            p.Pages(round=r.number, runs=tuple(batch), payload=view[offset : offset + size])
                        )
                        r.send_s += time.perf_counter() - t
                        offset += size
                    r.bytes_raw += offset

    async def _stop_and_copy(self, dirty: list[Run]) -> None:
        with deadline(self.settings.round_timeout_s, "the switch-over: final copy, verification, commit (--round-timeout)"):
            await self._switch_over(dirty)
        if not self.settings.keep_source:
            _terminate(self.layout.pid)

    async def _switch_over(self, dirty: list[Run]) -> None:
        freeze_at, verify_at = await self._final_copy(dirty)
        await self._commit(freeze_at, verify_at)

    async def _final_copy(self, dirty: list[Run]) -> tuple[float, float]:
        """Freeze, send the last pages and the digests; returns when they were started."""
        s = self.settings
        number = len(self.rounds)
        freeze_at = time.perf_counter()
        await trio.to_thread.run_sync(self.throttle.freeze)
        self.parts["freeze"] = _ms(time.perf_counter() - freeze_at)
        await self.channel.send(p.Freeze(round=number))
        t = time.perf_counter()
        late = await trio.to_thread.run_sync(self.tracker.collect)
        final = union(dirty, late, self.layout.page_size)
        self.parts["final_scan"] = _ms(time.perf_counter() - t)
        r = _Round(number, count_pages(final))
        t = time.perf_counter()
        await self._send_pages(r, final)
        await self.channel.send(p.RoundEnd(round=number, stats={"pages": r.dirty_pages, "final": True}))
        await self.channel.flush()
        self.parts["final_send"] = _ms(time.perf_counter() - t)
        self.final_pages = r.dirty_pages
        t = time.perf_counter()
        last = {"last": s.verify != "full"}
        await self.channel.send(p.Digest(kind="pages", value=self.digests.value(), stats=last))
        if s.verify == "full":
            h = time.perf_counter()
            await self.channel.flush()  # the destination starts hashing its side meanwhile
            value = await self._region_digest()
            self.parts["region_digest"] = _ms(time.perf_counter() - h)
            await self.channel.send(p.Digest(kind="region", value=value))
        await self.channel.flush()
        return freeze_at, t

    async def _commit(self, freeze_at: float, t: float) -> None:
        ack = await self._expect_ack("digest")
        self.parts["verify"] = _ms(time.perf_counter() - t) - self.parts.get("region_digest", 0.0)
        for key, value in ack.detail.items():
            if key.endswith("_ms"):
                self.parts["dest_" + key[:-3]] = float(value)
        if not ack.ok:
            raise MigrationFailed(f"destination refused the copy: {ack.detail.get('reason', 'verification failed')}")
        self.verified = True
        # ---- point of no return: from here the source guest never resumes ----
        t = time.perf_counter()
        self.throttle.commit(self.id, control=self.guest_control, destination=self.address)
        self.committed = True
        await self.channel.send(p.Commit())
        await self.channel.flush()
        ack = await self._expect_ack("commit")
        self.parts["commit"] = _ms(time.perf_counter() - t)
        if not ack.ok:
            raise MigrationFailed(f"destination failed to resume: {ack.detail.get('reason', '?')}")
        self.downtime_ms = _ms(time.perf_counter() - freeze_at)

    async def _region_digest(self) -> bytes:
        """The region digest (``migrator.core.digest``) of the frozen region, equal to the restore
        guest's own ``digest`` answer, so the two compare directly.

        Its pieces are hashed on every core. A memfd guest is hashed in place; a private
        guest's pieces are read across processes a chunk at a time into a small buffer per
        thread, which stays in the cache while it is hashed.
        """
        if len(self.layout.regions) != 1:
            raise MigratorError("--verify full needs a guest with one region")
        region = self.layout.regions[0]
        if isinstance(self.memory, MemfdMemory):
            return await trio.to_thread.run_sync(region_digest, self.memory.view(region.start, region.length))
        ps = self.layout.page_size

        def read(offset: int, view: memoryview) -> None:
            self.memory.read_runs([(region.start + offset, len(view) // ps)], view)

        return await trio.to_thread.run_sync(region_digest_read, region.length, read, DIGEST_CHUNK)

    # --- report ------------------------------------------------------------------------------

    def _report(self, total_s: float, error: BaseException | None) -> dict:
        s = self.settings
        rounds = [asdict(r) for r in self.rounds]
        return {
            "kind": "migration",
            "settings": {
                "downtime_ms": s.downtime_ms, "max_rounds": s.max_rounds, "tracker": s.tracker,
                "compress": s.compress, "streams": s.streams, "bandwidth": s.bandwidth,
                "verify": s.verify, "tls": s.tls is not None, "size_bytes": self.layout.total_bytes if hasattr(self, "layout") else None,
                "pages": self.layout.total_pages if hasattr(self, "layout") else None,
            },
            "rounds": rounds,
            "rule": self.rule,
            "rule_reason": self.rule_reason,
            "throttle_max": self.throttle_max,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "final_pages": getattr(self, "final_pages", None),
            "downtime_ms": getattr(self, "downtime_ms", None),
            "downtime_parts_ms": self.parts,
            "total_s": total_s,
            "pages_sent": sum(r.dirty_pages - r.zero_pages for r in self.rounds) + (getattr(self, "final_pages", 0) or 0),
            "bytes_raw": sum(r.bytes_raw for r in self.rounds),
            "bytes_wire": self.channel.statistics().bytes_wire if hasattr(self, "channel") else 0,
            "verified": self.verified,
            "verify": s.verify,
            "result": "committed" if error is None else "failed",
            "committed": self.committed,
            "error": None if error is None else describe(error),
        }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


