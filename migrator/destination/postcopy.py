"""Post-copy, seen from the destination: a guest that runs before all of its pages are here.

The source names the stale pages (``Discard``); the restore guest drops them (MADV_DONTNEED, its
own ``discard`` command) and its region is registered for userfaultfd MISSING faults with the
guest's own uffd, which it hands over as it does to a tracker. From then on every page arrives
through ``UFFDIO_COPY`` (``faults.MissingPages.install``), which installs it atomically and wakes
any thread of the guest waiting for it. A task reads the guest's faults and asks the source for
each faulting page and a window after it (``Request``), ahead of the background push.

When the source's page digest arrives every stale page has been sent; once they are all
installed and the digests agree the MISSING registration is dropped and the guest is trackable
again with WP_ASYNC, so it can be migrated onward.

If the source or the link goes away first, the guest is not killed and not unregistered: it
holds its uffd itself, so a thread touching a missing page waits there (paused on its next
missing page, as a QEMU guest after a failed post-copy) instead of reading zeros.

Where the session's urgent link allows it (``Channel.native_faults``) the faults are served by
a native loop from the switch on (``NativeFaults``): it reads the uffd, asks and installs on
the urgent link itself, with neither event loop nor GIL on a fault's path. If its link fails,
the task here takes over, as for a session that never had one.
"""

from __future__ import annotations

import os
import statistics as stats_
import threading
import time
from dataclasses import dataclass

import trio

from .. import protocol as p
from ..core.digest import PageDigests
from ..core.deadlines import deadline
from ..core.errors import MigrationFailed, MigratorError, ProtocolError, RemoteProtocolError, TransportError
from ..core.model import MemoryLayout, Run
from ..core.runs import count_pages
from ..guest.client import GuestClient
from .batches import apply_in_batches, drained
from .faults import MISSING, REQUESTED, MissingPages, guest_page_pairs
from .native_faults import NativeFaults

# interrupted post-copies waiting for their source, by migration id (one receiver process):
# (where a resuming session's channel goes, the migration that waits for it)
_WAITING: dict[str, tuple[trio.MemorySendChannel, object]] = {}

RESUME_LAYOUT_S = 30.0   # Resume to the resumed session's Layout
REFUSAL_SEND_S = 2.0     # how long telling a refused source why may take
FAULT_WINDOW = 16        # pages asked for per fault: the faulting page and the ones after it
BULK_QUEUE = 32          # pushed events waiting for the installer thread (the receive loop never does)
BULK_BATCH = 4           # pushed events installed per worker-thread call


@dataclass(frozen=True, slots=True)
class ReceivedPostcopy:
    """What post-copy did here: faults, pages by how they came, fault latency, the guest's pace."""

    stale_pages: int
    discarded_pages: int
    faults: int                      # distinct faulting pages asked for
    requested_pages: int             # pages installed that a fault had asked for
    pushed_pages: int                # pages installed from the background push
    fault_p50_ms: float | None
    fault_p99_ms: float | None
    fault_max_ms: float | None
    duration_s: float | None         # resume to the last page installed and verified
    guest_write_rate: float | None   # the guest's writes/s while post-copy ran
    native_faults: bool = False      # served by the native loop on the urgent link


async def wait_for_resume(migration: str, owner, timeout_s: float):
    """``owner`` (a destination migration) waits up to ``timeout_s`` for a session resuming
    ``migration``; returns its channel, or None."""
    send, receive = trio.open_memory_channel(1)
    _WAITING[migration] = (send, owner)
    try:
        with trio.move_on_after(timeout_s):
            return await receive.receive()
        return None
    finally:
        if _WAITING.get(migration, (None,))[0] is send:
            del _WAITING[migration]


async def hand_over(migration: str, channel):
    """A session that began with Resume: check its Layout against the interrupted migration's
    (``owner.src``), give its channel to that migration and return it (its ``finished`` says
    when the session is over). A session naming no waiting migration is refused with an Abort;
    one whose Layout differs with a refused Ack(resume), and the migration waits on for the
    rest of its recover timeout, so that an operator's mistaken ``migrate --resume`` does not
    cost it its source."""
    waiting = _WAITING.get(migration)
    if waiting is None:
        await _refuse(channel, p.Abort(reason=f"no interrupted post-copy of migration {migration!r} waits here"))
        raise MigrationFailed(f"a source asked to resume migration {migration!r}, which no post-copy here waits for")
    send, owner = waiting
    with deadline(RESUME_LAYOUT_S, "waiting for the resumed session's Layout"):
        layout = await channel.receive()
    expected = owner.src
    if not (isinstance(layout, p.Layout) and tuple(layout.regions) == expected.regions
            and layout.page_size == expected.page_size):
        reason = "the resumed session's Layout differs from the interrupted migration's"
        await _refuse(channel, p.Ack(of=p.Acked.RESUME, ok=False, reason=reason))
        raise MigrationFailed(f"refused a source resuming migration {migration}: {reason} (it waits on)")
    if _WAITING.get(migration, (None,))[0] is not send:     # another session took it meanwhile
        await _refuse(channel, p.Abort(reason=f"migration {migration!r} was resumed by another session"))
        raise MigrationFailed(f"a second source asked to resume migration {migration!r}")
    del _WAITING[migration]
    await send.send(channel)
    return owner


async def _refuse(channel, event: p.Event) -> None:
    """Tell a resuming source why it is refused, if it still listens."""
    with trio.move_on_after(REFUSAL_SEND_S):
        try:
            await channel.send(event)
            await channel.flush()
        except (MigratorError, OSError):
            pass    # it is gone, or aborted already: the refusal stands


class IncomingPostcopy:
    """Armed at the first Discard; used by the destination's engine from its receive loop.

    ``deliver`` installs an event that answers a fault at once, on the receive loop, and hands
    pushed ones to an installer task (a worker thread per batch), so that neither the receive
    loop nor the fault task ever waits behind the push.
    """

    def __init__(self, channel, client: GuestClient, src: MemoryLayout, dst: MemoryLayout,
                 digests: PageDigests) -> None:
        self.channel = channel
        self.client = client
        self.src = src
        self.dst = dst
        self.digests = digests
        self.missing: MissingPages | None = None
        self.native: NativeFaults | None = None
        self._finished = False
        self.discarded = 0
        self.faults = 0
        self.requested = 0
        self.pushed = 0
        self._waiting: dict[int, float] = {}    # faulting page address -> when its fault was read
        self._counting = threading.Lock()        # the installer thread and the receive loop count
        self._latencies: list[float] = []
        self.resumed_at: float | None = None
        self._steps_at_resume: int | None = None
        self.duration_s: float | None = None
        self.guest_write_rate: float | None = None

    async def arm(self, nursery: trio.Nursery) -> None:
        """Take the guest's uffd, register its region for MISSING faults, start serving faults."""
        attachment = await trio.to_thread.run_sync(self.client.attach, "wp-async")
        if attachment.uffd is None:
            raise MigrationFailed("the restore guest has no userfaultfd to hand over: post-copy needs it "
                                  "(userfaultfd access in the restore guest)")
        if attachment.memfd is not None:
            os.close(attachment.memfd)
        self.missing = MissingPages(attachment.uffd, self.dst)
        self._nursery = nursery
        self._faults_scope = trio.CancelScope()
        nursery.start_soon(self._serve_faults, self._faults_scope)
        self._bulk_in, bulk_out = trio.open_memory_channel(BULK_QUEUE)
        nursery.start_soon(apply_in_batches, bulk_out, BULK_BATCH, self._install_all)

    async def discard(self, runs: list[Run]) -> None:
        """Stale pages (source addresses): missing here from now on, until installed. MISSING
        mode is registered after the guest's first discard, which waits for its background
        populate: registered earlier, the populate would stop at the first absent page."""
        dst_runs = self.src.translate(runs, self.dst)
        self.missing.mark_missing(dst_runs)
        await trio.to_thread.run_sync(self.client.discard, guest_page_pairs(self.dst, dst_runs))
        self.register()
        self.discarded += count_pages(runs)

    def register(self) -> None:
        """MISSING mode on the guest's region (again is harmless)."""
        self.missing.register()

    async def serve_natively(self, channel) -> None:
        """At the switch (the guest is frozen: no fault is pending): the urgent link goes to the
        native loop, which serves the faults from now on instead of ``_serve_faults``."""
        sock = await channel.take_urgent_socket()
        try:
            self.native = NativeFaults(self.missing, sock, self.src, FAULT_WINDOW)
        except BaseException:
            os.close(sock)
            raise
        self._faults_scope.cancel()
        self._nursery.start_soon(self._serve_native, self.native)

    async def _serve_native(self, native: NativeFaults) -> None:
        await native.run()
        if native.failure is not None and not self._finished:
            # the source or the link went away: the Python path serves the faults, over a
            # resumed session's channel once there is one
            self._faults_scope = trio.CancelScope()
            self._nursery.start_soon(self._serve_faults, self._faults_scope)

    async def native_ended(self) -> None:
        """Once the source's end record came on the native link (or the link failed), with the
        native loop's answered pages in the digests; at once without a native loop."""
        if self.native is None:
            return
        await self.native.ended.wait()
        self.native.record_digests(self.digests)

    async def deliver(self, runs: list[Run], payload) -> None:
        """A Pages (payload) or Zero (None) event's pages after the switch: at once if a fault
        asked for one of them, else through the installer (in order, after those before)."""
        dst_runs = self.src.translate(runs, self.dst)
        states = self.missing.states
        if self.resumed_at is None or any(states.value_at(address) == REQUESTED for address, _ in dst_runs):
            self.install(runs, payload, dst_runs)    # before the resume: what the guest's first steps touch
        else:
            await self._bulk_in.send((runs, payload, dst_runs))

    async def drained(self) -> None:
        """Wait until every pushed event handed over so far is installed."""
        await drained(self._bulk_in)

    def _install_all(self, events) -> None:
        for runs, payload, dst_runs in events:
            self.install(runs, payload, dst_runs)

    def install(self, runs: list[Run], payload, dst_runs: list[Run] | None = None) -> None:
        """Install an event's pages (any thread) and record their digests."""
        if dst_runs is None:
            dst_runs = self.src.translate(runs, self.dst)
        installed, requested = self.missing.install(dst_runs, payload)
        with self._counting:
            self.requested += requested
            self.pushed += installed - requested
        self.digests.record_runs(self.src, runs, payload)
        if self._waiting:
            now = time.perf_counter()
            ps = self.dst.page_size
            with self._counting:
                for address in [a for a in self._waiting if any(s <= a < s + n * ps for s, n in dst_runs)]:
                    self._latencies.append(now - self._waiting.pop(address))

    async def resumed(self) -> None:
        if self.resumed_at is None:
            self.resumed_at = time.perf_counter()
        self._steps_at_resume = await trio.to_thread.run_sync(self._steps)

    def _steps(self) -> int | None:
        try:
            return int(self.client.stats()["steps"])
        except Exception:  # noqa: BLE001 - only a report figure
            return None

    async def finish(self) -> None:
        """Every page is in: drop the MISSING registration (the guest is trackable again)."""
        if self.missing.missing:
            raise RemoteProtocolError(f"the source's page digest came with {self.missing.missing} pages still missing here")
        self.missing.finish()
        self._finished = True
        self._faults_scope.cancel()
        if self.native is not None:
            self.native.stop()
        self._bulk_in.close()          # the installer task ends
        if self.resumed_at is not None:
            self.duration_s = time.perf_counter() - self.resumed_at
            steps = await trio.to_thread.run_sync(self._steps)
            if steps is not None and self._steps_at_resume is not None and self.duration_s > 0:
                self.guest_write_rate = round((steps - self._steps_at_resume) / self.duration_s, 1)

    def close(self) -> None:
        if self.native is not None:
            self.native.close()
        if self.missing is not None:
            self.missing.close()

    async def _serve_faults(self, scope: trio.CancelScope) -> None:
        """Read the guest's faults; ask the source for each faulting page not asked for yet."""
        missing = self.missing
        with scope:
            while True:
                await self._serve_some_faults(missing)

    async def _serve_some_faults(self, missing: MissingPages) -> None:
        """Wait for faults; ask for the pages of those nobody asked for yet."""
        await trio.lowlevel.wait_readable(missing.fileno())
        addresses = missing.read_faults()
        if not addresses:
            return
        now = time.perf_counter()
        runs = missing.claim(addresses, FAULT_WINDOW)
        if not runs:
            return
        firsts = {a for a, _ in runs}
        with self._counting:
            for address in addresses:
                if address in firsts and address not in self._waiting:
                    self._waiting[address] = now
                    self.faults += 1
        try:
            await self.channel.send(p.Request(runs=tuple(self.dst.translate(runs, self.src))))
            await self.channel.flush()
        except (TransportError, ProtocolError):
            # the link is down, or the session ended under this send (its state refuses a
            # Request once the source's EOF is read): the receive loop sees the same end, and a
            # resumed session is told of every page still lacking
            pass

    def lacking(self) -> list[Run]:
        """Every page not current here (restore-guest addresses), now REQUESTED: a resumed
        session's source sends each again, whatever it sent before the cut."""
        states, ps = self.missing.states, self.dst.page_size
        whole = [(r.start, r.length // ps) for r in self.dst.regions]
        states.claim(whole, REQUESTED, MISSING)
        return states.claim(whole, MISSING, REQUESTED)

    def timings(self) -> dict[str, float]:
        """What the source reports of this side (Ack.timings_ms)."""
        report = self.statistics()
        out: dict[str, float] = {"faults": float(report.faults)}
        for key in ("fault_p50_ms", "fault_p99_ms", "fault_max_ms"):
            value = getattr(report, key)
            if value is not None:
                out[key.removesuffix("_ms")] = value
        if report.guest_write_rate is not None:
            out["guest_write_rate"] = report.guest_write_rate
        return out

    def statistics(self) -> ReceivedPostcopy:
        native = self.native.statistics() if self.native is not None else None
        lat = sorted(self._latencies + list(native.latencies_s if native is not None else ()))
        faults, requested, pushed = self.faults, self.requested, self.pushed
        if native is not None:
            faults += native.faults
            requested += native.requested_pages
            pushed += native.installed_pages - native.requested_pages

        def quantile(q: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 3)

        return ReceivedPostcopy(
            stale_pages=self.missing.missing + requested + pushed if self.missing is not None else 0,
            discarded_pages=self.discarded, faults=faults, requested_pages=requested,
            pushed_pages=pushed, fault_p50_ms=round(stats_.median(lat) * 1000, 3) if lat else None,
            fault_p99_ms=quantile(0.99), fault_max_ms=quantile(1.0),
            duration_s=None if self.duration_s is None else round(self.duration_s, 4),
            guest_write_rate=self.guest_write_rate, native_faults=native is not None,
        )
