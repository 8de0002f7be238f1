"""What a migration did, as frozen values: one ``RoundStats`` per round, one ``MigrationReport``.

The report is built once, at the end of a run (failed or not), from what the phases measured, and
serialised in one place (``MigrationReport.to_dict``): the JSON that ``--report`` writes and the
command line renders, its fields exactly the dataclasses' (``docs/schemas/migrator.migration.v1.json``
is generated from them). ``from_dict`` reads one back, checking every field's type: a report
file is hostile input. A failed run leaves the totals it never reached as None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Literal

from ..core.documents import Schema, header, read, to_data


@dataclass(frozen=True, slots=True)
class RoundStats:
    """What one pre-copy round did; the convergence policy and the report read these.

    Round 0 sends every populated page; round i > 0 sends the pages written during round i-1.
    ``dirty_pages`` is what the scan at the start of the round found (for round 0: the populated
    pages); ``dirty_rate`` is pages written per second while the previous round ran.
    """

    round: int
    dirty_pages: int           # pages the scan reported for this round
    zero_pages: int            # of those, pages sent as zero ranges (no bytes)
    bytes_raw: int             # page bytes before compression
    bytes_wire: int            # bytes on the wire (frames, after compression)
    scan_s: float              # the scan that found this round's pages (round 0: the first scan)
    read_s: float              # reading the guest's pages
    compress_s: float          # compression (summed over worker threads)
    send_s: float              # waiting on the transport
    duration_s: float          # wall time of the round
    dirty_rate: float          # pages/s written by the guest during the previous round
    bandwidth: float           # raw bytes/s this round achieved
    expected_downtime_ms: float  # if we froze now: pages left x cost per page + fixed part
    throttle: float = 0.0      # auto-converge duty cycle in force (0 = none, 0.99 = max)
    exchange_s: float = 0.0    # RoundEnd flushed -> the destination's Ack (0: nothing acknowledges)
    pages_left: int = -1       # pages written during the round: the next round's or the final copy's (-1: not recorded)
    expected_fixed_ms: float = 0.0  # of expected_downtime_ms, the part no page adds (freeze, scan, exchanges)


@dataclass(frozen=True, slots=True)
class PostcopyReport:
    """The post-copy phase: when it switched, how its pages arrived, what the guest felt.

    ``switch_round`` is the round whose scan ended pre-copy (0 with ``--postcopy``). Pages
    reached the destination pushed in the background or requested by its guest's faults (a
    page requested after the push had sent it goes again: ``duplicate_pages``);
    ``fault_*_ms`` run from the fault's message to the page's install, measured there.
    ``guest_rate_*`` are the guest's writes/s before the freeze and while post-copy ran.
    ``native_faults``: the requests were answered by the native loops on the urgent link
    (an authenticated loopback or unix-socket link), not as frames through the event loops."""

    switch_round: int
    stale_pages: int                 # pages the destination did not have at the switch
    discarded_ahead: int             # of those, dropped there before the freeze
    pushed_pages: int
    requested_pages: int
    requests: int
    duration_s: float | None         # the commit's Ack to the destination's verdict on every page
    faults: int | None = None        # page faults the destination's guest took
    fault_p50_ms: float | None = None
    fault_p99_ms: float | None = None
    fault_max_ms: float | None = None
    guest_rate_before: float | None = None
    guest_rate_after: float | None = None
    recoveries: int = 0              # sessions that took over after the link broke (--recover-timeout)
    resent_pages: int = 0            # pages sent again after such a break
    duplicate_pages: int = 0         # pages a fault asked for after the push had sent them, sent again
    native_faults: bool = False


@dataclass(frozen=True, slots=True)
class ReportSettings:
    """The settings a run used, as the report shows them (no secrets: whether TLS was on, not how)."""

    downtime_ms: float
    max_rounds: int
    tracker: str
    compress: str
    streams: int
    bandwidth: float | None
    verify: str
    tls: bool
    size_bytes: int | None      # None: the run failed before the guest's layout was known
    pages: int | None
    frame_macs: bool | None = None   # the session's frames carried MACs (False: checksums); None: no session
    mode: str = "precopy"            # "precopy", "postcopy" (--postcopy) or "hybrid" (--postcopy-after)


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """One migration's outcome. ``committed`` says on which side of the point of no return it
    ended; ``result`` is "committed" ("written" for a checkpoint) or "failed"; ``error`` is one
    line when it failed. The header (``schema`` … ``peer``) is ``migrator.core.documents``'."""

    SCHEMA: ClassVar[str] = "migrator.migration"

    schema: Schema
    migrator_version: str
    started_at: str            # ISO 8601, UTC
    id: str                    # the migration's id, the destination's report has the same
    peer: str | None           # the receiver's address (a checkpoint: the image directory)
    kind: Literal["migration", "checkpoint"]
    settings: ReportSettings
    rounds: tuple[RoundStats, ...]
    result: Literal["committed", "written", "failed"]
    committed: bool
    verified: bool
    error: str | None
    total_s: float
    rule: str = ""
    rule_reason: str = ""
    throttle_max: float = 0.0
    rtt_ms: float | None = None
    final_pages: int | None = None
    downtime_ms: float | None = None
    downtime_parts_ms: Mapping[str, float] = field(default_factory=dict)
    bytes_wire: int = 0
    pages_sent: int = 0        # pages whose bytes were sent: every round's non-zero pages and the final copy's
    bytes_raw: int = 0         # page bytes before compression, over every round
    pages_lent: int = 0        # of pages_sent, those sent from the guest's shared memory in place (no copy)
    control: str | None = None  # the control socket it answered status/cancel/set on
    postcopy: PostcopyReport | None = None   # set when the run switched to post-copy

    def __post_init__(self) -> None:
        object.__setattr__(self, "downtime_parts_ms", MappingProxyType(dict(self.downtime_parts_ms)))

    def to_dict(self) -> dict:
        """The report as JSON-ready data: the one serialisation of it."""
        return to_data(self)

    @classmethod
    def from_dict(cls, data: object) -> MigrationReport:
        """A report read back (parsed JSON); MigratorError with one line naming a bad field."""
        return read(cls, data)


def report_of(settings, *, layout, precopy, switchover, wire_bytes: int, rule: tuple[str, str],
              error: str | None, total_s: float, result: str, committed: bool, kind: str = "migration",
              tls: bool = False, id: str, peer: str | None, started_at: str,
              control: str | None = None, frame_macs: bool | None = None,
              postcopy: PostcopyReport | None = None, mode: str = "precopy") -> MigrationReport:
    """The report from what a run's phases measured (``precopy``, ``switchover``, ``layout``: None
    for a phase the run never reached); ``settings`` is the run's ``MigrateSettings``."""
    s = settings
    rounds = tuple(precopy.rounds) if precopy else ()
    final_pages = switchover.final_pages if switchover else None
    return MigrationReport(
        **header(MigrationReport.SCHEMA, id=id, peer=peer, started_at=started_at),
        kind=kind,
        settings=ReportSettings(
            downtime_ms=s.downtime_ms, max_rounds=s.max_rounds, tracker=s.tracker, compress=s.compress,
            streams=s.streams, bandwidth=s.bandwidth, verify=s.verify, tls=tls,
            size_bytes=layout.total_bytes if layout else None, pages=layout.total_pages if layout else None,
            frame_macs=frame_macs, mode=mode,
        ),
        rounds=rounds,
        result=result,
        committed=committed,
        verified=bool(switchover and switchover.verified),
        error=error,
        total_s=total_s,
        rule=rule[0],
        rule_reason=rule[1],
        throttle_max=precopy.throttle_max if precopy else 0.0,
        rtt_ms=None if precopy is None or precopy.rtt_ms is None else round(precopy.rtt_ms, 3),
        final_pages=final_pages,
        downtime_ms=switchover.downtime_ms if switchover else None,
        downtime_parts_ms=switchover.parts if switchover else {},
        bytes_wire=wire_bytes,
        pages_sent=sum(r.dirty_pages - r.zero_pages for r in rounds)
        + (postcopy.pushed_pages + postcopy.requested_pages + postcopy.duplicate_pages if postcopy
           else final_pages or 0),
        bytes_raw=sum(r.bytes_raw for r in rounds),
        pages_lent=precopy.pages.lent if precopy else 0,
        control=control,
        postcopy=postcopy,
    )
