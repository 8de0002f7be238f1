"""Expected stop-and-copy downtime: a fixed part plus a cost per page, learned from the rounds.

Remaining bytes / round-0 bandwidth underestimates the final copy: round 0 streams contiguous
memory, while the last pages are scattered and cost ~1.5x more per byte (shared/kernel-abi.md,
"Pre-copy on this machine"; a bandwidth-only rule missed a 10 ms target by up to 60 %). So the
model is ``fixed_ms + pages * per_page_ms``, where the per-page cost comes from the send phases of
the later rounds, which move scattered pages like the final copy does. Each observation gives a
cost per page (its time over its pages, so per-round overheads are charged to the pages: a
conservative bias; once the switch-over's exchange is measured, a round's share of it is taken
off, since the fixed part holds it). The estimate is a weighted upper quantile of the recent
costs, recent rounds weighing most, so one slow round counts fully while it is recent and ages
out later. Round-0
observations stand in, times ``ROUND0_PENALTY``, until a later round has been seen. A bandwidth
cap sets a floor: no page moves faster than ``page_size / bandwidth``.

The fixed part is learned from the run too, once a live destination has acknowledged a round:
the freeze, the final scan (the latest scan: the same walk over the region), the switch-over's
two exchanges with the destination (each as long as the quickest recent RoundEnd -> Ack, which
is the destination's drain of its apply queue, the link's round trip and both ends' hops) and
the few local calls around them. Nothing in it is a constant tuned on one machine, so a tight
target is met wherever the data path allows. Until then (and for a checkpoint, which has no
destination to ask) a prior stands in: ``switchover_fixed_ms``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..core.errors import MigratorError
from ..core.model import PAGE_SIZE

DEFAULT_FIXED_MS = 1.0          # wake the guest for SIGSTOP, final scan, end/ack exchange (1 GiB)
DEFAULT_PER_PAGE_MS = 0.003     # 2-3 us per leftover page, uncompressed, loopback
ROUND0_PENALTY = 1.5            # scattered pages cost ~1.5x the per-byte time of round 0
MIN_FIT_PAGES = 256             # smaller rounds are mostly per-round overhead and timer noise
WINDOW = 8                      # observations kept
DECAY = 0.75                    # weight of an observation relative to the next newer one
QUANTILE = 0.9                  # of the weighted costs: the estimate ignores at most 10 % of weight

# The prior for the switch-over's fixed part, before a live destination acknowledged a round
# (and for checkpoints): freezing, the final scan, the digest and commit steps, as on the 2-vCPU
# test machine, with a share that grows with the region for the scan and the image's fsyncs.
SWITCHOVER_FIXED_MS = 10.0
DEST_CHECK_MS_PER_GIB = 20.0

# The learned fixed part: what it adds to the measured scan and exchanges.
FREEZE_MS = 1.0                 # stopping every guest thread (confirmed by waitpid in well under 1 ms)
LOCAL_CALLS_MS = 1.0            # the destination's check and resume calls, the source's commit record
SWITCHOVER_EXCHANGES = 2        # Digest -> verdict, Commit -> resumed: each a RoundEnd -> Ack's length


def switchover_fixed_ms(region_bytes: int) -> float:
    """The prior for the expected downtime's fixed part for a region of ``region_bytes``."""
    return SWITCHOVER_FIXED_MS + DEST_CHECK_MS_PER_GIB * region_bytes / (1 << 30)


@dataclass(frozen=True)
class EstimatorStatistics:
    fixed_ms: float             # the fixed part expected_ms() uses
    fixed_source: str           # "measured" (scan and exchanges of this run) | "prior"
    scan_ms: float | None       # the latest scan, if measured
    exchange_ms: float | None   # the quickest recent RoundEnd -> Ack, if measured
    per_page_ms: float          # the cost expected_ms() uses (after the bandwidth floor)
    floor_per_page_ms: float    # page_size / bandwidth (0 without a cap)
    observations: int           # later-round observations in the window
    round0_observations: int
    source: str                 # "rounds" | "round-0" | "default": where per_page_ms came from


class DowntimeEstimator:
    """Feed it ``observe(pages, seconds)`` per round; ask ``expected_ms(pages)``. Pure, no clock."""

    def __init__(
        self,
        *,
        fixed_ms: float = DEFAULT_FIXED_MS,
        default_per_page_ms: float = DEFAULT_PER_PAGE_MS,
        bandwidth: float | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        if fixed_ms < 0 or default_per_page_ms < 0:
            raise MigratorError(f"costs must be >= 0, got fixed_ms={fixed_ms}, per_page_ms={default_per_page_ms}")
        self._fixed_ms = fixed_ms
        self._default_ms = default_per_page_ms
        self.set_bandwidth(bandwidth, page_size)
        self._costs: deque[tuple[int, float]] = deque(maxlen=WINDOW)   # (pages, ms), oldest first
        self._round0: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self._scan_ms: float | None = None
        self._exchanges: deque[float] = deque(maxlen=WINDOW)  # ms, oldest first

    def set_bandwidth(self, bandwidth: float | None, page_size: int = PAGE_SIZE) -> None:
        """The link's cap (None: uncapped) sets the floor; ``migrator set bandwidth=`` moves it.
        Costs observed under the old cap stay; after a raise they overestimate until newer rounds
        replace them, which errs towards another round rather than a missed target."""
        if bandwidth is not None and bandwidth <= 0:
            raise MigratorError(f"bandwidth must be > 0 bytes/s, got {bandwidth}")
        self._floor_ms = page_size / bandwidth * 1e3 if bandwidth else 0.0

    def observe_scan(self, seconds: float) -> None:
        """A scan of the guest's memory took ``seconds``; the final scan will take about as long."""
        if seconds < 0:
            raise ValueError(f"observe_scan needs seconds >= 0, got {seconds}")
        self._scan_ms = seconds * 1e3

    def observe_exchange(self, seconds: float) -> None:
        """The destination acknowledged a RoundEnd ``seconds`` after it was flushed."""
        if seconds < 0:
            raise ValueError(f"observe_exchange needs seconds >= 0, got {seconds}")
        self._exchanges.append(seconds * 1e3)


    def observe(self, pages: int, seconds: float, *, round0: bool = False) -> None:
        """Record that a send phase moved ``pages`` pages in ``seconds`` (round 0's: ``round0=True``)."""
        if pages < 0 or seconds < 0:
            raise ValueError(f"observe needs pages >= 0 and seconds >= 0, got {pages}, {seconds}")
        if pages < MIN_FIT_PAGES:
            return
        (self._round0 if round0 else self._costs).append((pages, seconds * 1e3))

    @staticmethod
    def _per_page(observations, exchange_ms: float | None, factor: float = 1.0) -> float:
        """The weighted upper quantile of the observations' costs per page. Once the fixed part is
        measured, a round's own RoundEnd -> Ack is its share: the rest is the pages' (else the
        exchange would be counted twice, and small rounds would look slow per page)."""
        costs = [max(ms - (exchange_ms or 0.0), 0.0) / pages * factor for pages, ms in observations]
        return _weighted_quantile(costs, QUANTILE)

    def expected_ms(self, pages: int) -> float:
        """Expected downtime if the guest froze now with ``pages`` pages left to copy."""
        if pages < 0:
            raise ValueError(f"pages must be >= 0, got {pages}")
        stats = self.statistics()
        return stats.fixed_ms + pages * stats.per_page_ms

    def statistics(self) -> EstimatorStatistics:
        exchange_ms = min(self._exchanges) if self._exchanges else None
        if self._costs:
            learned, source = self._per_page(self._costs, exchange_ms), "rounds"
        elif self._round0:
            learned, source = self._per_page(self._round0, exchange_ms, ROUND0_PENALTY), "round-0"
        else:
            learned, source = self._default_ms, "default"
        if exchange_ms is None:
            fixed_ms, fixed_source = self._fixed_ms, "prior"
        else:
            fixed_ms = FREEZE_MS + LOCAL_CALLS_MS + (self._scan_ms or 0.0) + SWITCHOVER_EXCHANGES * exchange_ms
            fixed_source = "measured"
        return EstimatorStatistics(
            fixed_ms=fixed_ms,
            fixed_source=fixed_source,
            scan_ms=self._scan_ms,
            exchange_ms=exchange_ms,
            per_page_ms=max(learned, self._floor_ms),
            floor_per_page_ms=self._floor_ms,
            observations=len(self._costs),
            round0_observations=len(self._round0),
            source=source,
        )


def _weighted_quantile(values_oldest_first, q: float) -> float:
    """Smallest value whose cumulative weight (ascending order) reaches ``q`` of the total.

    The newest value weighs 1, each older one ``DECAY`` times the next newer one.
    """
    n = len(values_oldest_first)
    weighted = sorted((v, DECAY ** (n - 1 - i)) for i, v in enumerate(values_oldest_first))
    goal = q * sum(w for _, w in weighted)
    total = 0.0
    for value, weight in weighted:
        total += weight
        if total >= goal - 1e-12:
            return value
    return weighted[-1][0]
