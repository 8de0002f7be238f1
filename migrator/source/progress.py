"""How far a running migration is, as frozen values the engine publishes and anyone may render.

A ``Progress`` is a snapshot taken on the trio thread from what the phases already count (the
round in progress, the rounds done, the link's counters): taking one costs a few attribute reads
and never waits. ``Sampler`` takes one every ``PERIOD_S`` while the migration runs, and one for
each round the moment it ends (``settled``: that round's ``RoundStats``, the very value the
report will hold, so a live view and the report agree to the round).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import trio

from ..core.documents import Schema
from .report import RoundStats

PERIOD_S = 0.2           # five samples a second: a terminal line that looks live

Phase = Literal["starting", "precopy", "switchover", "committed", "failed"]


@dataclass(frozen=True, slots=True)
class Progress:
    """One snapshot. Byte counts are page bytes before compression unless they say ``wire``."""

    SCHEMA: ClassVar[str] = "migrator.progress"

    schema: Schema
    id: str
    phase: Phase
    elapsed_s: float
    round: int                   # the round in progress (or the last one, once pre-copy is over)
    round_pages: int             # pages that round sends
    round_sent_bytes: int        # of them, bytes sent so far
    remaining_bytes: int         # the round's bytes not sent yet
    transferred_wire_bytes: int  # on the wire since the start, every round
    total_bytes: int | None      # the guest's memory
    dirty_rate: float            # pages/s the guest wrote during the last finished round
    throughput: float            # wire bytes/s, over the round in progress
    expected_downtime_ms: float | None   # the last finished round's estimate, if we froze then
    downtime_target_ms: float
    throttle: float              # auto-converge duty cycle in force
    eta_s: float | None          # until the round in progress ends, at the current throughput
    settled: RoundStats | None = None    # the round that just ended (one sample per round)
    control: str | None = None   # the control socket answering status/cancel/set, if any


class Sampler:
    """Takes ``Progress`` snapshots of one migration (``source``: a ``SourceMigration``) and hands
    them to ``publish``."""

    def __init__(self, source, publish: Callable[[Progress], None]) -> None:
        self.source = source
        self.publish = publish
        self.started = time.perf_counter()
        self.phase: Phase = "starting"
        self._round_start: tuple[int, float, int] | None = None   # (round, when first seen, wire bytes then)

    def snapshot(self, settled: RoundStats | None = None) -> Progress:
        src, now = self.source, time.perf_counter()
        precopy = src._precopy
        rounds = list(precopy.rounds) if precopy else []
        current = precopy.current if precopy else None
        last = rounds[-1] if rounds else None
        page_size = src._guest.layout.page_size if src._guest else 4096
        wire = src._sink.statistics().bytes_wire if src._sink else 0
        if current is not None and (last is None or current.number > last.round):
            number, pages, sent = current.number, current.dirty_pages, current.bytes_raw
            to_send = (current.dirty_pages - current.zero_pages) * page_size
            throughput = self._round_throughput(number, now, wire)
        elif last is not None:
            number, pages, sent, to_send = last.round, last.dirty_pages, last.bytes_raw, last.bytes_raw
            throughput = last.bandwidth
        else:
            number, pages, sent, to_send, throughput = 0, 0, 0, 0, 0.0
        remaining = max(0, to_send - sent)
        layout = src._guest.layout if src._guest else None
        phase = self.phase
        if phase == "starting" and precopy is not None:
            phase = "switchover" if src._switchover is not None else "precopy"
        return Progress(
            schema=Schema(Progress.SCHEMA), id=src.id, phase=phase, elapsed_s=round(now - self.started, 3),
            round=number, round_pages=pages, round_sent_bytes=sent, remaining_bytes=remaining,
            transferred_wire_bytes=wire,
            total_bytes=layout.total_bytes if layout else None,
            dirty_rate=last.dirty_rate if last else 0.0, throughput=throughput,
            expected_downtime_ms=last.expected_downtime_ms if last else None,
            downtime_target_ms=src.settings.downtime_ms,
            throttle=precopy.throttle if precopy else 0.0,
            eta_s=remaining / throughput if throughput > 0 and phase == "precopy" else None,
            settled=settled, control=getattr(src, "control_path", None),
        )

    def _round_throughput(self, number: int, now: float, wire: int) -> float:
        """Bytes/s on the wire since this round was first seen: over the round so far, because
        pages go in 4 MiB frames (a shorter window is lumpy on a slow link), and on the wire, not
        handed to the sender (which queues a few frames ahead of the link)."""
        if self._round_start is None or self._round_start[0] != number:
            self._round_start = (number, now, wire)
        _, t0, wire0 = self._round_start
        return (wire - wire0) / (now - t0) if now > t0 else 0.0

    def round_ended(self, stats: RoundStats) -> None:
        self.publish(self.snapshot(settled=stats))

    def ended(self, phase: Phase) -> None:
        self.phase = phase
        self.publish(self.snapshot())

    async def run(self) -> None:
        """Publish a snapshot every ``PERIOD_S`` until cancelled."""
        while True:
            self.publish(self.snapshot())
            await trio.sleep(PERIOD_S)
