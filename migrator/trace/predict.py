"""Pre-copy predicted from a trace: the rounds a migration of the traced process would run.

Round 0 sends the whole tracked memory, ``V_0`` pages (the layout of the trace's first
interval). Round ``i`` lasts ``V_i / B`` seconds at ``B`` pages/s, and the next round sends the
pages the trace shows written during that window: the union of the pages of the intervals it
covers. Pre-copy stops once that set fits the downtime target (``classic_model.stop_pages``, the
same switch-over rule as the engine's) or after ``max_rounds`` rounds; what is left is sent with
the process frozen. When the rounds run out first, auto-converge (throttling) would be needed.

The trace loops: a window past its end wraps to its start, as ``guest --replay`` would replay it.
The trace cannot say when within an interval a page was written, so each page of an interval
only partly inside a window counts as written in it with that fraction as its probability, the
intervals independently: a page of two half-covered intervals (and of none wholly inside) counts
3/4, not 1. (Counting each partial interval's share in full over-counted such pages, which a
hot set rewritten every interval has in every window: measured against ``guest --replay``
migrations, it predicted dirty sets up to a quarter too large in rounds shorter than two
intervals, and so the engine's growth rule firing rounds too early.)

``classic`` runs ``classic_model.predict`` fed the trace's mean dirty rate, for comparison: the
classic rule counts every written page of a window as new, so repeated writes to a hot set make
it pessimistic, and the trace-driven rounds show by how much.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from ..core.errors import MigratorError
from ..experiment.classic_model import Prediction, predict, stop_pages
from ..source.policy import Action, PolicySettings, Rule, decide
from ..source.report import RoundStats
from .model import Trace, interval_pages

_FULL = 1 - 1e-9


class Timeline:
    """A trace's intervals as page sets on a time axis starting at 0, looping at ``length``."""

    def __init__(self, trace: Trace) -> None:
        if not trace.intervals:
            raise MigratorError("the trace holds no intervals")
        origin = trace.intervals[0].start
        self.spans = [(i.start - origin, i.t - origin, interval_pages(i, trace.page_size))
                      for i in trace.intervals if i.seconds > 0]
        self.length = trace.intervals[-1].t - origin
        if not self.spans or self.length <= 0:
            raise MigratorError("the trace's intervals last no time")
        self.everything = set().union(*(pages for _, _, pages in self.spans))

    def written(self, start: float, end: float) -> float:
        """Distinct pages written in ``[start, end)`` seconds (looping), partial intervals pro rata."""
        if end - start >= self.length:
            return float(len(self.everything))
        a = start % self.length
        pieces = [(a, a + end - start)] if a + end - start <= self.length else \
            [(a, self.length), (0.0, a + end - start - self.length)]
        union: set[int] = set()
        partial: list[tuple[float, set[int]]] = []
        for lo, hi in pieces:
            for s, e, pages in self.spans:
                overlap = min(hi, e) - max(lo, s)
                if overlap <= 0:
                    continue
                fraction = overlap / (e - s)
                if fraction >= _FULL:
                    union |= pages
                else:
                    partial.append((fraction, pages))
        return len(union) + _expected_union([(f, pages - union) for f, pages in partial])


def _expected_union(partial: list[tuple[float, set[int]]]) -> float:
    """Expected size of the union when each page of set i is in it with probability f_i,
    independently: inclusion-exclusion over the sets (a window cuts at most two intervals per
    piece of it, so there are a handful), set intersections rather than a loop over pages."""
    total = 0.0
    for k in range(1, len(partial) + 1):
        for chosen in itertools.combinations(partial, k):
            common = set.intersection(*(pages for _, pages in chosen))
            if common:
                total += (-1) ** (k + 1) * math.prod(f for f, _ in chosen) * len(common)
    return total


def volume_pages(trace: Trace) -> int:
    return trace.tracked_pages(trace.intervals[0]) if trace.intervals else 0


def mean_rate(trace: Trace) -> float:
    seconds = sum(i.seconds for i in trace.intervals)
    return sum(i.dirty_pages for i in trace.intervals) / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class Comparison:
    volume: int
    bandwidth: float    # pages/s
    stop_at: float      # pages
    trace: Prediction
    classic: Prediction
    dirty_rate: float   # the trace's mean, pages/s, which the classic model is fed


def simulate(trace: Trace, bandwidth: float, *, stop_at: float, max_rounds: int, volume: int | None = None,
             start: float = 0.0, policy: PolicySettings | None = None, fixed_ms: float = 0.0,
             first_round_s: float | None = None) -> Prediction:
    """Pre-copy rounds over ``trace`` at ``bandwidth`` pages/s (see the module docstring), the
    migration starting ``start`` seconds into the trace (a replaying guest says where it is).

    With ``policy``, the engine's own switch-over rules (``migrator.source.policy.decide``, fed
    each round's pages and the downtime the pages left would take plus ``fixed_ms``) decide
    instead of ``stop_at``: min-pages and, with ``force_switchover``, no-progress end pre-copy as
    they would in a migration; a round where the engine would start auto-converge ends the
    prediction unconverged (the throttle is not simulated). ``first_round_s``: round 0's duration
    when known (a measured migration's: the destination populating fresh memory slows it),
    instead of its pages over ``bandwidth``."""
    if not bandwidth > 0 or max_rounds < 1:
        raise MigratorError(f"predict needs bandwidth > 0 and max_rounds >= 1, got {bandwidth}, {max_rounds}")
    timeline = Timeline(trace)
    pages = [float(volume_pages(trace) if volume is None else volume)]
    history: list[RoundStats] = []
    now = start
    while True:
        seconds = first_round_s if len(pages) == 1 and first_round_s else pages[-1] / bandwidth
        following = timeline.written(now, now + seconds)
        now += seconds
        if policy is not None:
            history.append(_round(len(history), pages[-1], seconds, fixed_ms, following / bandwidth * 1e3, following))
            decision = decide(history, replace(policy, max_rounds=max_rounds))
            if decision.action is not Action.CONTINUE:
                converged = decision.rule in (Rule.DOWNTIME_TARGET, Rule.MIN_PAGES)
                return Prediction(tuple(pages), following, converged)
        elif following <= stop_at:
            return Prediction(tuple(pages), following, True)
        elif len(pages) >= max_rounds:
            return Prediction(tuple(pages), following, False)
        pages.append(following)


def _round(number: int, pages: float, seconds: float, fixed_ms: float, copy_ms: float, left: float) -> RoundStats:
    """What the policy reads of a simulated round (the rest of a real round's statistics is 0)."""
    return RoundStats(round=number, dirty_pages=round(pages), zero_pages=0, bytes_raw=0, bytes_wire=0, scan_s=0.0,
                      read_s=0.0, compress_s=0.0, send_s=0.0, duration_s=seconds, dirty_rate=0.0, bandwidth=0.0,
                      expected_downtime_ms=fixed_ms + copy_ms, pages_left=round(left), expected_fixed_ms=fixed_ms)


def compare(trace: Trace, bandwidth_bytes: float, *, downtime_s: float, max_rounds: int) -> Comparison:
    bandwidth = bandwidth_bytes / trace.page_size
    stop = stop_pages(downtime_s, bandwidth)
    volume = volume_pages(trace)
    rate = mean_rate(trace)
    return Comparison(
        volume=volume, bandwidth=bandwidth, stop_at=stop, dirty_rate=rate,
        trace=simulate(trace, bandwidth, stop_at=stop, max_rounds=max_rounds, volume=volume),
        classic=predict(volume, rate, bandwidth, stop_at=stop, max_rounds=max_rounds),
    )
