"""The switch-over: freeze the guest, send the last pages and the digests, then (live) commit.

Every part of the downtime is timed under its own name in ``parts`` (ms): ``freeze``,
``final_scan``, ``final_send``, ``region_digest`` (``--verify full``), ``verify`` (waiting for the
destination's verdict), the destination's own parts (``dest_*``), ``commit_record`` (making the
stop permanent and recording it, the point of no return) and ``commit`` (Commit to the
destination guest's resume).

**The point of no return** is ``commit``: the source sends Commit only after the destination has
acknowledged the digests and its guest's self-check. From that moment the source guest never
resumes (the caller kills it, or keeps it frozen with ``--keep-source``).
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from .. import protocol as p
from ..core.digest import PageDigests, region_digest, region_digest_read
from ..core.errors import DeadlineExceeded, MigrationFailed, MigratorError
from ..core.model import Region, Run
from ..core.runs import count_pages, union
from ..tracker.memory import MemfdMemory
from .attach import AttachedGuest
from .pages import PageStream, RoundTimer
from .rounds import ms
from .sink import PeerSink, Sink

DIGEST_CHUNK = 1 << 20   # bytes per read while hashing the frozen region (--verify full)
# The switch-over's own deadline, from the freeze to the commit: this many times the downtime
# target, at least MIN_DEADLINE_S, plus FULL_VERIFY_S_PER_GIB per GiB with --verify full (both
# ends hash the whole region inside it). Past it the migration aborts and the source resumes:
# a stalled receiver must not hold the guest frozen for a round timeout.
DEADLINE_TARGETS = 40
MIN_DEADLINE_S = 2.0
FULL_VERIFY_S_PER_GIB = 2.0


def switchover_deadline_s(downtime_ms: float, *, verify: str, region_bytes: int) -> float:
    """How long the switch-over may take before it counts as stalled (see DEADLINE_TARGETS)."""
    limit = max(MIN_DEADLINE_S, DEADLINE_TARGETS * downtime_ms / 1000)
    if verify == "full":
        limit += FULL_VERIFY_S_PER_GIB * region_bytes / (1 << 30)
    return limit


@contextmanager
def bounded(state: Switchover, seconds: float):
    """Fail with one line naming the step that stalled once ``seconds`` have passed; after the
    point of no return the failure says so (the caller keeps the source frozen)."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise DeadlineExceeded(
            f"the switch-over stalled at '{state.step}' (over {seconds:g} s since the freeze; --switchover-timeout)"
        ) from None


@dataclass
class Switchover:
    """The final copy's outcome and timings, filled in as it goes."""

    number: int                                  # the final round's number
    parts: dict[str, float] = field(default_factory=dict)
    freeze_at: float = 0.0
    final_pages: int | None = None
    downtime_ms: float | None = None
    verified: bool = False
    step: str = "freeze"                         # what it is doing now, for a stall's message


async def freeze_and_scan(guest: AttachedGuest, sink: Sink, state: Switchover,
                          within: tuple[Region, ...] | None = None) -> tuple[list[Run], float]:
    """Freeze the guest (the downtime starts), say so, and collect what it wrote since the last
    scan (only ``within``, when given: ``DirtyTracker.collect``); returns the runs and when the
    scan began (``final_scan`` is the caller's to close)."""
    state.freeze_at = time.perf_counter()
    await trio.to_thread.run_sync(guest.throttle.freeze)
    state.parts["freeze"] = ms(time.perf_counter() - state.freeze_at)
    await sink.send(p.Freeze(round=state.number))
    state.step = "final scan"
    t = time.perf_counter()
    # On the event loop: with the guest frozen nothing else is due, and a hand-over to a worker
    # thread and back costs a fair share of the walk itself while both CPUs are busy.
    return guest.tracker.collect(within), t


async def final_copy(guest: AttachedGuest, sink: Sink, pages: PageStream, digests: PageDigests,
                     dirty: list[Run], state: Switchover, *, verify: str) -> float:
    """Freeze, send the last pages and the digests; returns when the digests were sent."""
    layout = guest.layout
    late, t = await freeze_and_scan(guest, sink, state)
    final = union(dirty, late, layout.page_size)
    state.parts["final_scan"] = ms(time.perf_counter() - t)
    timer = RoundTimer(state.number, count_pages(final))
    state.step = "final send"
    t = time.perf_counter()
    await pages.send(timer, final)
    await sink.send(p.RoundEnd(round=state.number, pages=timer.dirty_pages, final=True))
    await sink.flush()
    state.parts["final_send"] = ms(time.perf_counter() - t)
    state.final_pages = timer.dirty_pages
    state.step = "digests"
    t = time.perf_counter()
    await sink.send(p.Digest(kind=p.DigestKind.PAGES, value=digests.value(), last=verify != "full"))
    if verify == "full":
        h = time.perf_counter()
        await sink.flush()  # the destination starts hashing its side meanwhile
        value = await region_digest_of(guest)
        state.parts["region_digest"] = ms(time.perf_counter() - h)
        await sink.send(p.Digest(kind=p.DigestKind.REGION, value=value, last=True))
    await sink.flush()
    return t


async def commit(sink: PeerSink, guest: AttachedGuest, state: Switchover, digests_sent_at: float, *,
                 migration: str, destination: str) -> None:
    """Wait for the destination's verdict, then cross the point of no return: the guest's stop
    is made permanent and recorded in its state file (``Throttle.commit``) before Commit is sent,
    so a migrator that dies from here on leaves a source that never runs again."""
    state.step = "the destination's verification"
    ack = await sink.expect_ack(p.Acked.DIGEST)
    state.parts["verify"] = ms(time.perf_counter() - digests_sent_at) - state.parts.get("region_digest", 0.0)
    for key, value in ack.timings_ms.items():
        state.parts["dest_" + key] = value
    if not ack.ok:
        raise MigrationFailed(f"destination refused the copy: {ack.reason or 'verification failed'}")
    state.verified = True
    await cross_point_of_no_return(sink, guest, state, migration=migration, destination=destination)


async def cross_point_of_no_return(sink: PeerSink, guest: AttachedGuest, state: Switchover, *, migration: str,
                                   destination: str, postcopy: bool = False) -> None:
    """Make the guest's stop permanent (its state file says so, and for a ``postcopy`` also
    which round switched, so that ``migrate --resume`` can finish it), send Commit and wait for
    the destination's guest to run; the downtime ends there. From here the source never resumes."""
    # ---- point of no return: from here the source guest never resumes ----
    state.step = "commit"
    t = time.perf_counter()
    await trio.to_thread.run_sync(
        functools.partial(guest.throttle.commit, migration, control=guest.guest_control, destination=destination,
                          layout=guest.layout, switch_round=state.number if postcopy else None)
    )
    guest.committed = True
    recorded = time.perf_counter()
    state.parts["commit_record"] = ms(recorded - t)
    ack = await sink.commit()
    state.parts["commit"] = ms(time.perf_counter() - recorded)
    if not ack.ok:
        raise MigrationFailed(f"destination failed to resume: {ack.reason or '?'}")
    state.downtime_ms = ms(time.perf_counter() - state.freeze_at)


async def region_digest_of(guest: AttachedGuest) -> bytes:
    """The region digest (``migrator.core.digest``) of the frozen region, equal to the restore
    guest's own ``digest`` answer, so the two compare directly.

    Its pieces are hashed on every core. A memfd guest is hashed in place; a private guest's
    pieces are read across processes a chunk at a time into a small buffer per thread, which
    stays in the cache while it is hashed.
    """
    layout, memory = guest.layout, guest.memory
    if len(layout.regions) != 1:
        raise MigratorError("--verify full needs a guest with one region")
    region = layout.regions[0]
    if isinstance(memory, MemfdMemory):
        return await trio.to_thread.run_sync(region_digest, memory.view(region.start, region.length))
    ps = layout.page_size

    def read(offset: int, view: memoryview) -> None:
        memory.read_runs([(region.start + offset, len(view) // ps)], view)

    return await trio.to_thread.run_sync(region_digest_read, region.length, read, DIGEST_CHUNK)
