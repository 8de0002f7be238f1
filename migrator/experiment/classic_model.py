"""The classic pre-copy model, as pure functions (no I/O, no clock): what the experiments compare to.

Pre-copy sends the whole region (``V`` pages) in round 0, then in each round the pages written
during the previous one. With the guest writing ``D`` pages/s and the link moving ``B`` pages/s,
round ``i`` lasts ``V_i / B`` seconds and dirties ``D * V_i / B`` pages, so::

    V_i = V * r**i        with r = D / B

It converges (the rounds shrink to the stop threshold) only for ``r < 1``. If the writes go to a
hot set of ``H`` pages, no round can find more than ``H`` dirty pages: ``V_{i+1} = min(r V_i, H)``,
and pre-copy stalls at ``H`` when ``H`` is above the threshold.

The classic model counts every write as a new dirty page. Real writes repeat pages: ``w`` writes
spread uniformly over ``N`` pages dirty ``N (1 - (1 - 1/N)**w)`` distinct pages on average.
``dirty_pages`` gives that expectation per write pattern, and ``predict`` accepts it in place of
the linear rule, which is how the experiments explain where the measurement leaves the line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import MigratorError
from ..guest.layout import Pattern

MIN_PAGES = 64   # the policy's min-pages rule (P.Haul): a round this small is not worth another


@dataclass(frozen=True)
class Prediction:
    """Pre-copy as the model sees it: pages sent per round, and what is left for stop-and-copy."""

    pages: tuple[float, ...]   # pages sent in each pre-copy round, round 0 first
    final_pages: float         # pages sent while the guest is frozen
    converged: bool            # the dirty set reached the stop threshold within max_rounds

    @property
    def rounds(self) -> int:
        return len(self.pages)

    @property
    def total_pages(self) -> float:
        return sum(self.pages) + self.final_pages

    def downtime_s(self, bandwidth: float, fixed_s: float = 0.0) -> float:
        """Freeze-to-resume time: the final pages at ``bandwidth`` pages/s plus a fixed part."""
        return fixed_s + self.final_pages / bandwidth


def ratio(dirty_rate: float, bandwidth: float) -> float:
    """``r``: pages dirtied per second over pages sent per second."""
    if not bandwidth > 0 or dirty_rate < 0:
        raise MigratorError(f"ratio needs bandwidth > 0 and dirty_rate >= 0 pages/s, got {bandwidth}, {dirty_rate}")
    return dirty_rate / bandwidth


def classic_pages(volume: float, r: float, rounds: int, hot_pages: float | None = None) -> list[float]:
    """``V * r**i`` for ``i < rounds``; with a hot set, each round after 0 capped at ``hot_pages``."""
    if volume < 0 or r < 0 or rounds < 0:
        raise MigratorError(f"classic_pages needs volume, r, rounds >= 0, got {volume}, {r}, {rounds}")
    pages = [float(volume)]
    while len(pages) < rounds:
        following = pages[-1] * r
        pages.append(following if hot_pages is None else min(following, float(hot_pages)))
    return pages[:rounds]


def rounds_to_converge(volume: float, r: float, stop_pages: float) -> float:
    """Pre-copy rounds before the dirty set is at most ``stop_pages`` (``math.inf`` if never).

    The smallest ``n >= 1`` with ``V r**n <= stop_pages``: rounds 0 .. n-1 run (round 0 always
    does), then stop-and-copy sends ``V r**n``. Agrees with ``predict`` under the classic rule.
    """
    if volume < 0 or r < 0 or stop_pages < 0:
        raise MigratorError(f"rounds_to_converge needs volume, r, stop_pages >= 0, got {volume}, {r}, {stop_pages}")
    if volume * r <= stop_pages:
        return 1
    if r >= 1 or stop_pages == 0:
        return math.inf
    return math.ceil(math.log(stop_pages / volume) / math.log(r) - 1e-9)


def stop_pages(downtime_s: float, bandwidth: float, fixed_s: float = 0.0, min_pages: float = MIN_PAGES) -> float:
    """The dirty-set size at which the switch-over rule fires: the pages that fit in the downtime
    target after its fixed part at ``bandwidth`` pages/s, or ``min_pages``, whichever is larger."""
    return max(min_pages, (downtime_s - fixed_s) * bandwidth)


def dirty_pages(writes: float, pages: int, pattern: str = "classic") -> float:
    """Expected distinct pages dirtied by ``writes`` page writes over ``pages`` pages.

    ``classic``: every write a new page (the textbook model, unbounded). ``uniform``: each write
    picks any page: ``N (1 - (1 - 1/N)**w)``. ``sequential``: page after page, ``min(w, N)``.
    ``hot:F:S``: a share ``S`` of the writes falls uniformly on ``F * N`` hot pages, the rest
    uniformly on the others (the guest's ``--pattern hot:F:S``).
    """
    if writes < 0 or pages <= 0:
        raise MigratorError(f"dirty_pages needs writes >= 0 and pages > 0, got {writes}, {pages}")
    kind = pattern.partition(":")[0]
    if kind == "classic":
        return float(writes)
    if kind == "sequential":
        return float(min(writes, pages))
    if kind == "uniform":
        return distinct_pages(writes, pages)
    if kind == "hot":
        share = _hot_pattern(pattern).share
        hot = hot_set_pages(pattern, pages)
        return distinct_pages(writes * share, hot) + distinct_pages(writes * (1 - share), pages - hot)
    raise MigratorError(f"pattern {pattern!r}: expected classic, uniform, sequential or hot:FRACTION:SHARE")


def hot_set_pages(pattern: str, pages: int) -> int | None:
    """The hot set's size in pages for a ``hot:F:S`` pattern, else None."""
    if pattern.partition(":")[0] != "hot":
        return None
    return min(pages - 1, max(1, round(_hot_pattern(pattern).fraction * pages)))


def _hot_pattern(pattern: str) -> Pattern:
    """The guest's own parser, so the model reads ``hot:F:S`` exactly as the guest does."""
    try:
        return Pattern.parse(pattern)
    except ValueError as exc:
        raise MigratorError(str(exc)) from None


def distinct_pages(writes: float, pages: int) -> float:
    """Expected distinct pages hit by ``writes`` uniform draws among ``pages``."""
    if pages <= 0 or writes <= 0:
        return 0.0
    if pages == 1:
        return 1.0
    # N (1 - (1 - 1/N)^w), computed stably for large N
    return pages * -math.expm1(writes * math.log1p(-1.0 / pages))


def predict(
    volume: float,
    dirty_rate: float,
    bandwidth: float,
    *,
    stop_at: float,
    max_rounds: int,
    dirtied: Callable[[float], float] | None = None,
    first_round_s: float | None = None,
) -> Prediction:
    """Simulate pre-copy: round 0 sends ``volume`` pages; a round of ``V_i`` pages lasts
    ``V_i / bandwidth`` seconds (round 0: ``first_round_s`` if given, for a first round slowed by
    something else than the link), during which the guest writes ``dirty_rate * seconds`` pages
    and dirties ``dirtied(writes)`` distinct ones (default: all of them, the classic rule). Stop
    once the dirty set is at most ``stop_at`` (converged) or ``max_rounds`` rounds have run (not)."""
    if not bandwidth > 0 or max_rounds < 1 or volume < 0 or dirty_rate < 0 or (first_round_s or 0) < 0:
        raise MigratorError(
            f"predict needs bandwidth > 0, max_rounds >= 1, volume, dirty_rate and first_round_s >= 0; got "
            f"{bandwidth}, {max_rounds}, {volume}, {dirty_rate}, {first_round_s}"
        )
    dirtied = dirtied or (lambda writes: writes)
    pages = [float(volume)]
    seconds = volume / bandwidth if first_round_s is None else first_round_s
    while True:
        following = dirtied(dirty_rate * seconds)
        if following <= stop_at:
            return Prediction(tuple(pages), following, True)
        if len(pages) >= max_rounds:
            return Prediction(tuple(pages), following, False)
        pages.append(following)
        seconds = following / bandwidth
