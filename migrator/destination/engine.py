"""The destination of one migration: start a restore-mode guest, apply pages, verify, resume.

The destination resumes its guest only after the source's Commit; before that any failure (bad
frame, lost connection, Abort, digest mismatch, failed self-check) discards the restore guest,
and the source, which has not committed, resumes its own. After a post-copy switch the guest
resumes before its stale pages are here (``postcopy``): they are installed as they arrive, and
the page digest is compared once the last one is in.

Pages are applied by a separate task fed through a bounded channel, several events per worker
thread call, so receiving, decompressing and applying overlap.
"""

from __future__ import annotations

import array
import contextlib
import functools
import tempfile
import time
from dataclasses import asdict, dataclass

import trio

from .. import protocol as p
from ..core.deadlines import deadline
from ..core.digest import PageDigests, new_hashes
from ..core.documents import header, utc_now
from ..core.errors import (DeadlineExceeded, LocalProtocolError, MigrationFailed, MigratorError, RemoteProtocolError,
                           TransportError)
from ..core.failures import describe
from ..core.heap import collector_paused
from ..core.meminfo import mem_available
from ..core.model import MemoryLayout, Run
from ..core.pagestate import page_index_pairs
from ..core.runs import count_pages
from .batches import apply_in_batches, drained
from ..guest.control import MAX_CHECK_RUNS
from ..guest.workload import check_pages_in
from ..tracker.memory import MemfdMemory
from .guests import RestoreGuests, RestoreTarget
from .placement import Placement, RunsPlacement, placer
from .postcopy import IncomingPostcopy, hand_over, wait_for_resume
from .report import ReceivedRound, ReceiveReport

LACKING_RUNS_PER_EVENT = 1 << 16
APPLY_QUEUE = 4          # Pages events (up to 4 MiB each) buffered between receiving and applying
APPLY_BATCH = 2          # events applied per worker-thread call
# Receive buffers a prepared receiver faults in ahead (``serve(receive_buffers=)``): the Pages
# frames a session holds at once, decoding, queued for the apply and being applied, with slack.
RECEIVE_BUFFERS = 16
INLINE_PAGES = 512       # a batch of at most this many pages is applied on the event loop
LAYOUT_TIMEOUT_S = 30.0
ABORT_LOOKUP_S = 2.0     # how long a refused reply looks for the source's Abort among queued events


@dataclass(frozen=True)
class ReceiveSettings:
    max_bytes: int = 64 << 30       # refuse layouts larger than this (bounds what a peer can make us map)
    memfd: bool = True              # restore guests on a shared memfd, pages received in place (post-copy: private)
    control_dir: str | None = None  # where restore guests' control sockets go
    idle_timeout_s: float = 120.0   # silence from the source longer than this fails the migration (past a
                                    # post-copy commit: ends the session, and the migration waits for a resume)
    recover_timeout_s: float = 600.0  # a post-copy cut off after its commit waits this long for its source
    deep_check: bool = False        # always run the deep self-check (restoring an image: no downtime to save)


class DestinationMigration:
    def __init__(self, channel, settings: ReceiveSettings = ReceiveSettings(), *, log=print,
                 guests: RestoreGuests | None = None) -> None:
        """``guests`` may hold a restore guest prepared ahead; by default one is started when
        the Layout arrives."""
        self.channel = channel
        self.settings = settings
        self.log = log
        self.guests = guests
        self.guest = None
        self.target: RestoreTarget | None = None
        self.prepared = False
        self.resumed = False
        self.parts: dict[str, float] = {}
        self.rounds: list[ReceivedRound] = []
        self.id = ""                    # the source's migration id, from its Layout
        self.pages_applied = 0
        self.pages_placed = 0
        self.apply_s = 0.0              # worker-thread time writing pages and hashing them
        self.failure: str | None = None
        self._inspection: _Job | None = None
        self._final_pages_listed = array.array("Q")  # the final copy's (first page, count) pairs, as they arrive
        self._downtime = contextlib.ExitStack()      # what holds from the Freeze to the resume
        self.self_check = "none"             # then what the restore guest's check covered
        self.postcopy: IncomingPostcopy | None = None   # armed by the source's first Discard
        self.finished = trio.Event()        # run() is over (a session that resumed this one waits for it)
        self._handed_to: DestinationMigration | None = None   # the interrupted migration this session resumed
        self.resuming = False               # the session began with Resume (refused: no migration of its own)

    async def run(self) -> ReceiveReport:
        started = time.perf_counter()
        started_at = utc_now()
        error: BaseException | None = None
        try:
            await self._run()
        except BaseException as exc:  # noqa: BLE001 - reported, then re-raised as MigrationFailed
            error = exc
        finally:
            if self.postcopy is not None:
                self.postcopy.close()     # the guest keeps its own uffd: a missing page waits, never reads zeros
            if self.target is not None:   # a guest that was not resumed is killed, even when cancelled
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.target.close if not self.resumed else self.target.release)
        report = self.report = ReceiveReport(
            **header(ReceiveReport.SCHEMA, id=self.id, peer=getattr(self.channel, "name", None), started_at=started_at),
            kind="receive",
            source_layout=tuple((r.start, r.length) for r in self.src.regions) if hasattr(self, "src") else None,
            guest_pid=self.guest.pid if self.guest else None,
            guest_control=self.guest.control if self.guest else None,
            restore_guest="prepared" if self.prepared else "started",
            rounds=tuple(self.rounds),
            pages_applied=self.pages_applied,
            pages_placed=self.pages_placed,
            apply_s=round(self.apply_s, 4),
            parts_ms=self.parts,
            self_check=self.self_check,
            postcopy=self.postcopy.statistics() if self.postcopy is not None and self.postcopy.missing is not None else None,
            total_s=time.perf_counter() - started,
            result="resumed" if self.resumed else "discarded",
            error=None if error is None else describe(error),
        )
        self.finished.set()
        if self._handed_to is not None and error is None:
            resumed = self._handed_to        # this session carried another migration's end
            await resumed.finished.wait()
            self.report = resumed.report
            if resumed.report.error is not None:
                raise MigrationFailed(resumed.report.error, committed=True)
            return resumed.report
        if error is not None:
            raise MigrationFailed(report.error, committed=self.resumed) from error
        return report

    async def _run(self) -> None:
        with deadline(LAYOUT_TIMEOUT_S, "waiting for the source's Layout"):
            event = await self.channel.receive()
        if isinstance(event, p.Resume):
            self.resuming = True
            self._handed_to = await hand_over(event.migration, self.channel)
            return
        if not isinstance(event, p.Layout):
            raise RemoteProtocolError(f"expected Layout first, got {type(event).__name__}")
        id = event.meta.get("id")
        self.id = id if isinstance(id, str) else ""
        t = time.perf_counter()
        await self._start_guest(event)
        # the source starts round 0 on this Ack, and takes the link's round trip from it: the
        # exchange's time minus ``ready_ms``, what this side spent in between
        ready_ms = round((time.perf_counter() - t) * 1000, 3)
        await self._reply(p.Ack(of=p.Acked.LAYOUT, ok=True, ready_ms=ready_ms))
        send_q, recv_q = trio.open_memory_channel(APPLY_QUEUE)
        try:
            with self._downtime:   # the collector, paused at the Freeze, is back on by the end
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(functools.partial(apply_in_batches, recv_q, APPLY_BATCH, self._apply,
                                                         small=_small_batch))
                    async with send_q:
                        await self._receive_loop(send_q)
        except BaseException as exc:
            if not self.resumed:
                with trio.move_on_after(2, shield=True):
                    try:
                        await self.channel.send(p.Abort(reason=f"destination failed: {describe(exc)}"))
                        await self.channel.flush()
                    except Exception:  # noqa: BLE001 - the link may be what failed
                        pass
            raise

    async def _reply(self, ack: p.Ack) -> None:
        """Send ``ack`` now. If the source aborted meanwhile (its Abort is read but not yet
        received here, so the send is refused), fail with the source's reason instead."""
        try:
            await self.channel.send(ack)
            await self.channel.flush()
        except LocalProtocolError:
            with trio.move_on_after(ABORT_LOOKUP_S):
                while not isinstance(event := await self.channel.receive(), p.Abort):
                    pass
                raise MigrationFailed(f"source aborted: {event.reason}") from None
            raise

    async def _start_guest(self, layout: p.Layout) -> None:
        """Start (or take the prepared) restore guest for ``layout``, once the Layout is known to
        fit: within ``max_bytes`` and, unless a guest of its size is prepared (its memory is held
        already), within the memory available now. A refusal is sent to the source as an Abort,
        before any memory is touched."""
        self.src = MemoryLayout(pid=0, page_size=layout.page_size, regions=tuple(layout.regions))
        total = self.src.total_bytes
        refusal = None
        if total > self.settings.max_bytes:
            refusal = f"layout of {total >> 20} MiB exceeds this receiver's limit of {self.settings.max_bytes >> 20} MiB (--max-size)"
        elif len(self.src.regions) != 1:
            refusal = f"layout has {len(self.src.regions)} regions; restore guests hold one"
        elif self.guests is None or total != self.guests.prepare:
            available = mem_available()
            if available is not None and total > available:
                refusal = (f"layout of {total >> 20} MiB exceeds the memory available on this receiver now "
                           f"({available >> 20} MiB, MemAvailable)")
        if refusal is not None:
            with trio.move_on_after(ABORT_LOOKUP_S, shield=True):
                try:
                    await self.channel.send(p.Abort(reason=f"destination refused: {refusal}"))
                    await self.channel.flush()
                except Exception:  # noqa: BLE001 - the source may be gone; the refusal stands
                    pass
            raise MigrationFailed(refusal)
        if self.guests is None:
            control_dir = self.settings.control_dir or tempfile.mkdtemp(prefix="migrator-")
            self.guests = RestoreGuests(control_dir, memfd=self.settings.memfd)
        # a post-copy faults pages into a private guest (userfaultfd MISSING on anonymous memory)
        peer = self.channel.peer     # None: an image's chain
        postcopy = peer is not None and p.POSTCOPY_SESSION in peer.features
        t = time.perf_counter()
        self.target = target = await self.guests.take(total, memfd=self.guests.memfd and not postcopy)
        self.parts["spawn_guest"] = (time.perf_counter() - t) * 1000
        self.guest, self.client, self.dst = target.guest, target.client, target.layout
        self.prepared = target.prepared
        if not self.src.same_shape(self.dst):
            raise MigrationFailed("restore guest's layout does not match the source's")
        # the restore guest's memory, taking the source's addresses at the same offsets
        self.memory = target.memory.translated(self.src, self.dst)
        self.digests = PageDigests(self.dst.total_pages, self.dst.page_size)
        if isinstance(self.memory, MemfdMemory):
            self.channel.place_pages(placer(self.memory, self.dst.page_size))
        self.log(f"receiving {total >> 20} MiB into restore guest pid {self.dst.pid}")

    def _apply(self, batch: list[tuple[int, tuple[Run, ...], object]]) -> None:
        """Worker thread: write a batch of page events into the restore guest and hash them."""
        started = time.perf_counter()
        # the layouts have the same shape: a page's index is the same in either
        memory = self.memory
        for round_no, runs, payload in batch:
            if type(payload) in (Placement, RunsPlacement):    # received in place: only hashed here
                payload.hash()
                self.digests.record_hashes(self.src, runs, payload.hashes)
                self.pages_applied += len(payload.hashes)
                self.pages_placed += len(payload.hashes)
            elif payload is None:  # a Zero event
                if round_no > 0:
                    memory.write_runs(runs, bytes(count_pages(runs) * self.dst.page_size))
                self.digests.record_runs(self.src, runs)
            else:
                pages = count_pages(runs)
                hashes = new_hashes(pages)    # each page hashed as it is written, while in the cache
                memory.write_runs(runs, payload, hashes=hashes)
                self.digests.record_hashes(self.src, runs, hashes)
                self.pages_applied += pages
        self.apply_s += time.perf_counter() - started

    async def _receive_loop(self, queue: trio.MemorySendChannel) -> None:
        freeze_at = None
        while True:
            try:
                with deadline(self.settings.idle_timeout_s, "waiting for the source (it sent nothing; --idle-timeout)"):
                    event = await self.channel.receive()
            except (TransportError, RemoteProtocolError, DeadlineExceeded) as exc:
                # after a post-copy commit a broken session (a link cut, ended inside a frame, or
                # silent past --idle-timeout) is waited out: its source, or an operator, may resume it
                if not (self.resumed and self.postcopy is not None and self.settings.recover_timeout_s > 0):
                    raise
                await self._wait_for_source(exc)
                continue
            if isinstance(event, (p.Pages, p.Zero)) and self.postcopy is not None:
                # post-copy: straight into place, where a faulting guest thread may be waiting
                await self.postcopy.deliver(list(event.runs), event.payload if isinstance(event, p.Pages) else None)
            elif isinstance(event, p.Pages):
                await queue.send((event.round, event.runs, event.payload))
                if freeze_at is not None:
                    self._list_final(event.runs)
            elif type(event) is p.PlacedPages:
                await queue.send((event.round, event.runs, event.owner))
                if freeze_at is not None:
                    self._list_final(event.runs)
            elif isinstance(event, p.Zero):
                await queue.send((event.round, event.runs, None))
                if freeze_at is not None:
                    self._list_final(event.runs)
            elif isinstance(event, p.Discard):
                t = time.perf_counter()
                await self._arm_postcopy(queue)
                await self.postcopy.discard(list(event.runs))
                key = "discard" if freeze_at is not None else "discard_ahead"
                self.parts[key] = self.parts.get(key, 0.0) + (time.perf_counter() - t) * 1000
            elif isinstance(event, p.Switch):
                await self._arm_postcopy(queue)
                self.postcopy.register()
                if event.pages != self.postcopy.missing.missing:
                    raise RemoteProtocolError(f"Switch names {event.pages} stale pages; the Discards named "
                                              f"{self.postcopy.missing.missing}")
                self.self_check = "none"      # the page digest covers every page, once the last is in
                if self.channel.native_faults:
                    await self.postcopy.serve_natively(self.channel)
                timings = {k: round(self.parts[k], 3) for k in ("discard",) if k in self.parts}
                await self._reply(p.Ack(of=p.Acked.SWITCH, ok=True, timings_ms=timings))
            elif isinstance(event, p.Digest) and self.postcopy is not None:
                await self._verify_postcopy(event)
                return
            elif isinstance(event, p.RoundEnd):
                self.rounds.append(ReceivedRound(round=event.round, pages=event.pages, final=event.final))
                if not event.final:  # the source waits until the round is applied
                    await drained(queue)
                    await self._reply(p.Ack(of=p.Acked.ROUND, ok=True, round=event.round))
            elif isinstance(event, p.Freeze):
                freeze_at = time.perf_counter()
                self._downtime.enter_context(collector_paused())   # no collection inside the downtime
            elif isinstance(event, p.Digest):
                t = time.perf_counter()
                await drained(queue)     # the final copy's pages still being applied
                self.parts.setdefault("final_apply", (time.perf_counter() - t) * 1000)
                await self._verify(event)
            elif isinstance(event, p.Commit) and self.postcopy is not None:
                # resuming, the guest may fault on a stale page: the pages keep coming meanwhile
                self.postcopy.resumed_at = time.perf_counter()   # pushed pages go to the installer now
                self._nursery.start_soon(self._resume, freeze_at)
            elif isinstance(event, p.Commit):
                await self._resume(freeze_at)
                return
            elif isinstance(event, p.Abort):
                raise MigrationFailed(f"source aborted: {event.reason}")
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} from the source")

    async def _resume(self, freeze_at: float | None) -> None:
        """Resume the guest (the source committed) and say so; after a post-copy switch its
        stale pages follow."""
        t = time.perf_counter()
        await trio.to_thread.run_sync(self.client.resume)
        self.resumed = True
        self.parts["resume"] = (time.perf_counter() - t) * 1000
        if freeze_at is not None:
            self.parts["since_freeze"] = (time.perf_counter() - freeze_at) * 1000
        await self._reply(p.Ack(of=p.Acked.COMMIT, ok=True, timings_ms={"resume": self.parts["resume"]}))
        self._downtime.close()
        follow = " (post-copy: its stale pages follow)" if self.postcopy is not None else ""
        self.log(f"resumed guest pid {self.dst.pid}{follow}, control {self.guest.control}")
        if self.postcopy is not None:
            await self.postcopy.resumed()

    async def _wait_for_source(self, lost: MigratorError) -> None:
        """The link broke after a post-copy commit: the guest waits on its missing pages while a
        new session of the same migration may take over (``hand_over``) within the recover
        timeout; it then learns which pages this side still lacks."""
        self.log(f"post-copy of {self.id}: the source is gone ({lost}); {self.postcopy.missing.missing} pages "
                 f"missing, waiting {self.settings.recover_timeout_s:g} s for it to reconnect")
        channel = await wait_for_resume(self.id, self, self.settings.recover_timeout_s)
        if channel is None:
            raise MigrationFailed(f"post-copy interrupted: the source did not reconnect within "
                                  f"{self.settings.recover_timeout_s:g} s (--recover-timeout; {lost}); the guest "
                                  f"waits on {self.postcopy.missing.missing} missing pages") from lost
        self.channel = self.postcopy.channel = channel     # its Layout matched ours (``hand_over``)
        lacking = self.dst.translate(self.postcopy.lacking(), self.src)
        for first in range(0, len(lacking), LACKING_RUNS_PER_EVENT):
            await channel.send(p.Lacking(runs=tuple(lacking[first : first + LACKING_RUNS_PER_EVENT])))
        await self._reply(p.Ack(of=p.Acked.RESUME, ok=True))
        self.log(f"post-copy of {self.id} resumed: {count_pages(lacking)} pages still lacking")

    async def _arm_postcopy(self, queue: trio.MemorySendChannel) -> None:
        """At the first Discard: every page of earlier rounds applied, then faults armed."""
        if self.postcopy is not None:
            return
        if isinstance(self.target.memory, MemfdMemory):
            raise MigrationFailed("post-copy needs a private restore guest: the source's Hello did not "
                                  f"say {p.POSTCOPY_SESSION!r}")
        await drained(queue)
        self.postcopy = IncomingPostcopy(self.channel, self.client, self.src, self.dst, self.digests)
        await self.postcopy.arm(self._nursery)

    async def _verify_postcopy(self, digest: p.Digest) -> None:
        """The source's page digest, after its last stale page: every page must be here and equal."""
        if digest.kind is not p.DigestKind.PAGES or not digest.last:
            raise RemoteProtocolError("post-copy ends with one page digest")
        t = time.perf_counter()
        await self.postcopy.native_ended()
        await self.postcopy.drained()
        await self.postcopy.finish()
        if digest.value != self.digests.value():
            self.failure = "page digests differ after post-copy: a page was corrupted or misapplied"
        self.parts["page_digest"] = (time.perf_counter() - t) * 1000
        ack = p.Ack(of=p.Acked.DIGEST, ok=self.failure is None, reason=self.failure or "",
                    timings_ms=self.postcopy.timings())
        await self._reply(ack)
        if self.failure:
            raise MigrationFailed(self.failure)

    async def _verify(self, digest: p.Digest) -> None:
        """Compare a source digest; after the last one, answer with the self-check's verdict.

        The source marks every digest but the last with ``last=False``. The guest's
        own work (its region digest for ``--verify full``, then its self-check) starts as soon
        as the page digest has arrived, so it overlaps the source hashing its frozen region.
        The self-check is shallow (control block, version table entries, headers) and covers the
        pages of the final copy only (``_final_pages``): when the digests match, the bytes are the
        source's, so page bodies need no second look and nothing in the downtime grows with the
        region; restoring an image (``deep_check``) checks every page's body too.
        """
        if digest.kind is p.DigestKind.PAGES:
            t = time.perf_counter()
            if digest.value != self.digests.value():
                self.failure = self.failure or "page digests differ: a page was corrupted or misapplied"
            self.parts["page_digest"] = (time.perf_counter() - t) * 1000
            self._inspection = _Job(self._nursery, self._inspect, not digest.last)
        else:  # DigestKind.REGION
            if self._inspection is None:
                raise RemoteProtocolError("region digest before the page digest")
            value, _ = await self._inspection.result()
            if value != digest.value:
                self.failure = self.failure or "region digests differ: the destination's memory is not the source's"
        if not digest.last:
            return
        _, check = await self._inspection.result()
        if self.failure is None and not check.get("clean"):
            self.failure = f"self-check failed at page {check.get('first_bad_page')}: {check.get('problem')}"
        timings = {k: round(v, 3) for k, v in self.parts.items()
                   if k in ("final_apply", "page_digest", "region_digest", "check")}
        ack = p.Ack(of=p.Acked.DIGEST, ok=self.failure is None, reason=self.failure or "", timings_ms=timings)
        await self._reply(ack)
        if self.failure:
            raise MigrationFailed(self.failure)

    async def _inspect(self, region: bool) -> tuple[bytes | None, dict]:
        """The restore guest's region digest (if asked) and self-check, timed."""
        value = None
        if region:
            t = time.perf_counter()
            value = bytes.fromhex(await trio.to_thread.run_sync(self.client.digest))
            self.parts["region_digest"] = (time.perf_counter() - t) * 1000
        pages = self._final_pages(whole=region)
        self.self_check = "region" if pages is None else "final copy"
        t = time.perf_counter()
        mapped = self._mapped_region() if pages is not None and not self.settings.deep_check else None
        if mapped is not None:    # the guest's own check, run here on its memory: no round trip to it
            result = check_pages_in(mapped, pages)
            check = asdict(result)     # the guest's answer, without its step count
        else:
            check = await trio.to_thread.run_sync(lambda: self.client.check(deep=self.settings.deep_check, pages=pages))
        self.parts["check"] = (time.perf_counter() - t) * 1000
        return value, check

    def _mapped_region(self):
        """The restore guest's one region as mapped here (a memfd guest), else None."""
        memory, regions = self.target.memory, self.dst.regions
        if not isinstance(memory, MemfdMemory) or len(regions) != 1:
            return None
        return memory.view(regions[0].start, regions[0].length)

    def _list_final(self, runs) -> None:
        """Note a final-copy event's pages for the self-check, while the rest still arrives."""
        if len(self._final_pages_listed) <= 2 * MAX_CHECK_RUNS:
            self._final_pages_listed.frombytes(page_index_pairs(self.src, runs))

    def _final_pages(self, whole: bool) -> bytes | None:
        """What the self-check inside the downtime covers: the pages the final copy wrote (runs
        of region pages), or None for every page. Pages of earlier rounds are the source's by the
        page digest already; the check covers the whole region when asked to (``--verify full``,
        restoring an image), when the final copy was too scattered to list, and when the layout
        is not the guest's single region."""
        listed = self._final_pages_listed
        if whole or self.settings.deep_check or len(self.dst.regions) != 1 or len(listed) > 2 * MAX_CHECK_RUNS:
            return None
        return listed.tobytes()


def _small_batch(batch: list[tuple[int, tuple[Run, ...], object]]) -> bool:
    return sum(count_pages(runs) for _, runs, _ in batch) <= INLINE_PAGES


class _Job:
    """A result computed by a task in ``nursery`` now, and awaited later."""

    def __init__(self, nursery: trio.Nursery, fn, *args) -> None:
        self._done = trio.Event()
        self._result = None
        nursery.start_soon(self._run, fn, *args)

    async def _run(self, fn, *args) -> None:
        self._result = await fn(*args)
        self._done.set()

    async def result(self):
        await self._done.wait()
        return self._result
