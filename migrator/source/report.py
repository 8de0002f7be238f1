"""What a migration did, as frozen values: one ``RoundStats`` per round, one ``MigrationReport``.

The report is built once, at the end of a run (failed or not), from what the phases measured, and
serialised in one place (``MigrationReport.to_dict``): the JSON that ``--report`` writes and the
command line renders. A failed run leaves the totals it never reached as None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType


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
    scan_s: float              # collect() time
    read_s: float              # reading the guest's pages
    compress_s: float          # compression (summed over worker threads)
    send_s: float              # waiting on the transport
    duration_s: float          # wall time of the round
    dirty_rate: float          # pages/s written by the guest during the previous round
    bandwidth: float           # raw bytes/s this round achieved
    expected_downtime_ms: float  # if we froze now: pages left x cost per page + fixed part
    throttle: float = 0.0      # auto-converge duty cycle in force (0 = none, 0.99 = max)


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


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """One migration's outcome. ``committed`` says on which side of the point of no return it
    ended; ``result`` is "committed" or "failed"; ``error`` is one line when it failed."""

    settings: ReportSettings
    rounds: tuple[RoundStats, ...]
    result: str
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
    kind: str = "migration"

    def __post_init__(self) -> None:
        object.__setattr__(self, "downtime_parts_ms", MappingProxyType(dict(self.downtime_parts_ms)))

    @property
    def pages_sent(self) -> int:
        """Pages whose bytes were sent: every round's non-zero pages and the final copy's."""
        return sum(r.dirty_pages - r.zero_pages for r in self.rounds) + (self.final_pages or 0)

    @property
    def bytes_raw(self) -> int:
        return sum(r.bytes_raw for r in self.rounds)

    def to_dict(self) -> dict:
        """The report as JSON-ready data: the one serialisation of it."""
        return {
            "kind": self.kind,
            "settings": asdict(self.settings),
            "rounds": [asdict(r) for r in self.rounds],
            "rule": self.rule,
            "rule_reason": self.rule_reason,
            "throttle_max": self.throttle_max,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "final_pages": self.final_pages,
            "downtime_ms": self.downtime_ms,
            "downtime_parts_ms": dict(self.downtime_parts_ms),
            "total_s": self.total_s,
            "pages_sent": self.pages_sent,
            "bytes_raw": self.bytes_raw,
            "bytes_wire": self.bytes_wire,
            "verified": self.verified,
            "verify": self.settings.verify,
            "result": self.result,
            "committed": self.committed,
            "error": self.error,
        }


def report_of(settings, *, layout, precopy, switchover, wire_bytes: int, rule: tuple[str, str],
              error: str | None, total_s: float, result: str, committed: bool, kind: str = "migration",
              tls: bool = False) -> MigrationReport:
    """The report from what a run's phases measured (``precopy``, ``switchover``, ``layout``: None
    for a phase the run never reached); ``settings`` is the run's ``MigrateSettings``."""
    s = settings
    return MigrationReport(
        kind=kind,
        settings=ReportSettings(
            downtime_ms=s.downtime_ms, max_rounds=s.max_rounds, tracker=s.tracker, compress=s.compress,
            streams=s.streams, bandwidth=s.bandwidth, verify=s.verify, tls=tls,
            size_bytes=layout.total_bytes if layout else None, pages=layout.total_pages if layout else None,
        ),
        rounds=tuple(precopy.rounds) if precopy else (),
        result=result,
        committed=committed,
        verified=bool(switchover and switchover.verified),
        error=error,
        total_s=total_s,
        rule=rule[0],
        rule_reason=rule[1],
        throttle_max=precopy.throttle_max if precopy else 0.0,
        rtt_ms=precopy.rtt_ms if precopy else None,
        final_pages=switchover.final_pages if switchover else None,
        downtime_ms=switchover.downtime_ms if switchover else None,
        downtime_parts_ms=switchover.parts if switchover else {},
        bytes_wire=wire_bytes,
    )
