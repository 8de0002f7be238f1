"""Which migrations an experiment runs: cells (one real migration each) grouped into sweeps.

A full product of every dimension (size x rate x bandwidth x pattern x tracker) is hundreds of
migrations; the presets instead vary a few dimensions at a time around a reference cell, which
answers the questions the plots ask within the time budget:

- ``rate``: dirty rate x bandwidth x pattern (wp-async, one size): convergence against ``r``;
- ``tracker``: the three trackers on the same guests (the migration half of the comparison);
- ``size``: region size at a fixed rate and bandwidth;
- ``throttle``: where pre-copy cannot converge, auto-converge against a forced switch-over;
- ``replay`` (``--traces``): guests replaying recorded traces (``guest --replay``), each next to
  what ``migrator predict`` says of the same trace at the same settings.

Cells switch over after ``max_rounds`` unless they ask for auto-converge: pure pre-copy is what
the model describes, and the throttle sweep shows what auto-converge changes.

Dirty rates are in percent of the region's pages per second (the guest's ``--dirty-rate`` is in
page writes per second: ``pct / 100 * pages``), bandwidths in bytes per second (None: no cap).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ..core.errors import MigratorError
from ..guest.layout import Pattern
from ..core.model import PAGE_SIZE
from ..core.units import parse_rate as parse_link_rate
from ..tracker import TRACKERS

MiB = 1 << 20
MB = 1_000_000
EXPERIMENT_TRACKERS = ("wp-async", "sync-wp", "full")   # soft-dirty needs CONFIG_MEM_SOFT_DIRTY
HOT = "hot:0.05:0.9"


@dataclass(frozen=True)
class Cell:
    """One migration: a guest of ``size`` bytes writing ``dirty_pct`` % of its pages per second
    (None: as fast as it can) with ``pattern``, migrated with ``tracker`` over a link capped at
    ``bandwidth`` bytes/s; with ``trace`` (a trace file's path) the guest replays it instead (its
    pattern is ``replay``, its rate the trace's, its size what the trace needs). Without ``auto_converge`` a migration that has not converged after the
    grid's ``max_rounds`` switches over anyway (pure pre-copy, what the model describes); with it,
    the engine throttles the guest instead (its default)."""

    size: int
    dirty_pct: float | None
    bandwidth: float | None
    pattern: str = "uniform"
    tracker: str = "wp-async"
    auto_converge: bool = False
    sweep: str = "custom"
    trace: str | None = None

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % PAGE_SIZE:
            raise MigratorError(f"cell size {self.size}: must be a positive multiple of {PAGE_SIZE}")
        if self.dirty_pct is not None and not self.dirty_pct > 0:
            raise MigratorError(f"cell dirty rate {self.dirty_pct} %/s: must be > 0 (or None: unlimited)")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise MigratorError(f"cell bandwidth {self.bandwidth}: must be > 0 bytes/s or None")
        if self.tracker not in TRACKERS:
            raise MigratorError(f"cell tracker {self.tracker!r}: choose one of {', '.join(TRACKERS)}")
        if self.trace is not None:
            if self.pattern != "replay" or self.dirty_pct is not None:
                raise MigratorError("a cell replaying a trace has pattern 'replay' and no dirty rate of its own")
            return
        try:
            Pattern.parse(self.pattern)
        except ValueError as exc:
            raise MigratorError(str(exc)) from None

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def dirty_rate(self) -> float | None:
        """Page writes per second (the guest's ``--dirty-rate``); None: unlimited."""
        return None if self.dirty_pct is None else self.dirty_pct / 100 * self.pages

    @property
    def name(self) -> str:
        rate = "unlimited-rate" if self.dirty_pct is None else f"{self.dirty_pct:g}%/s"
        bandwidth = "unlimited" if self.bandwidth is None else f"{self.bandwidth / MB:g}MB/s"
        throttle = " auto-converge" if self.auto_converge else ""
        if self.trace is not None:
            return f"{self.size / MiB:.3g}MiB {self.pattern_label} {bandwidth} {self.tracker}{throttle}"
        return f"{self.size // MiB}MiB {self.pattern} {rate} {bandwidth} {self.tracker}{throttle}"

    @property
    def pattern_label(self) -> str:
        """The pattern, with the trace's file name for a replay."""
        return f"replay:{os.path.basename(self.trace)}" if self.trace is not None else self.pattern


@dataclass(frozen=True)
class CompareSettings:
    """The tracker comparison's guest-slowdown part (its migrations are the ``tracker`` sweep):
    one guest writing without limit, watched for ``window_s`` by each tracker in turn (and by
    none), the tracker collecting every ``interval_s``; trackers alternate, ``repeats`` times."""

    size: int = 64 * MiB
    pattern: str = "uniform"
    trackers: tuple[str, ...] = EXPERIMENT_TRACKERS
    window_s: float = 2.0          # tracking window per tracker (guest at unlimited rate)
    interval_s: float = 0.1        # collect() every this often during the window
    repeats: int = 3               # windows per tracker, alternating trackers
    enabled: bool = True


@dataclass(frozen=True)
class Grid:
    """Cells plus the settings every migration of the grid shares."""

    name: str
    cells: tuple[Cell, ...]
    downtime_ms: float = 10.0     # tight enough that a 64 MiB region is not sent in one go
    max_rounds: int = 15          # then switch over anyway (or auto-converge, per cell)
    compress: str = "none"        # the model counts raw pages; random fill does not compress
    fill: str = "random"
    repeats: int = 1
    settle_s: float = 0.3         # let the guest reach its write rate before migrating
    compare: CompareSettings = field(default_factory=CompareSettings)

    def __post_init__(self) -> None:
        if not self.cells:
            raise MigratorError(f"grid {self.name!r} has no cells")
        if self.downtime_ms <= 0 or self.max_rounds < 1 or self.repeats < 1:
            raise MigratorError("downtime_ms, max_rounds and repeats must be positive")

    def runs(self) -> list[tuple[int, Cell]]:
        """(repeat, cell) in run order: repeats interleaved, so slow drift hits every cell alike."""
        return [(repeat, cell) for repeat in range(self.repeats) for cell in self.cells]


def product(
    *,
    sizes: Iterable[int],
    rates: Iterable[float | None],
    bandwidths: Iterable[float | None],
    patterns: Iterable[str],
    trackers: Iterable[str],
    sweep: str,
    auto_converge: bool = False,
) -> list[Cell]:
    """Every combination, in a stable order (size, tracker, pattern, bandwidth, rate)."""
    return [
        Cell(size=size, dirty_pct=rate, bandwidth=bandwidth, pattern=pattern, tracker=tracker,
             auto_converge=auto_converge, sweep=sweep)
        for size, tracker, pattern, bandwidth, rate in itertools.product(
            list(sizes), list(trackers), list(patterns), list(bandwidths), list(rates)
        )
    ]


def default_grid() -> Grid:
    """About 90 migrations, within 15 minutes on the 2-vCPU test machine (about 6 when quiet)."""
    patterns = ("uniform", HOT, "sequential")
    cells = product(
        sizes=[64 * MiB], rates=[0.1, 1, 5, 20, 50, 100], bandwidths=[50 * MB, 200 * MB, None],
        patterns=patterns, trackers=["wp-async"], sweep="rate",
    )
    cells += product(
        sizes=[64 * MiB], rates=[20, 100], bandwidths=[100 * MB], patterns=("uniform", HOT),
        trackers=EXPERIMENT_TRACKERS, sweep="tracker",
    )
    cells += product(
        sizes=[16 * MiB, 64 * MiB, 256 * MiB, 512 * MiB], rates=[20], bandwidths=[200 * MB],
        patterns=["uniform"], trackers=["wp-async"], sweep="size",
    )
    # auto-converge where pre-copy alone cannot converge: a paced guest (r > 1) and one writing
    # as fast as it can, each with the forced switch-over of the other sweeps for comparison
    for auto_converge in (False, True):
        cells += product(
            sizes=[64 * MiB], rates=[100], bandwidths=[50 * MB], patterns=("uniform", HOT),
            trackers=["wp-async"], sweep="throttle", auto_converge=auto_converge,
        )
        cells += product(
            sizes=[64 * MiB], rates=[None], bandwidths=[None], patterns=("uniform", HOT),
            trackers=["wp-async"], sweep="throttle", auto_converge=auto_converge,
        )
    return Grid("default", tuple(cells))


def quick_grid() -> Grid:
    """A CI smoke run (< 60 s on 2 cores): a handful of 16-32 MiB cells, short comparison windows."""
    cells = product(
        sizes=[32 * MiB], rates=[5, 60], bandwidths=[100 * MB], patterns=("uniform", HOT, "sequential"),
        trackers=["wp-async"], sweep="rate",
    )
    cells += product(
        sizes=[16 * MiB], rates=[20], bandwidths=[None], patterns=["uniform"],
        trackers=EXPERIMENT_TRACKERS, sweep="tracker",
    )
    compare = CompareSettings(size=16 * MiB, window_s=0.5, repeats=1)
    return Grid("quick", tuple(cells), settle_s=0.2, compare=compare)


SYNTHETIC = ("sizes", "rates", "patterns")   # the dimensions a replay cell takes from its trace


def custom_grid(base: Grid, *, auto_converge: bool = False, traces: Iterable[tuple[str, int]] = (),
                **dimensions: list) -> Grid:
    """``base``'s settings with one product sweep over the given dimensions (others from the
    reference cell: 64 MiB, 5 %/s, 200 MB/s, uniform, wp-async). With ``traces`` ((path, region
    size) each), a ``replay`` sweep of those traces over the bandwidths and trackers instead, plus
    the synthetic sweep if sizes, rates or patterns are given too."""
    defaults = {"sizes": [64 * MiB], "rates": [5.0], "bandwidths": [200 * MB], "patterns": ["uniform"],
                "trackers": ["wp-async"]}
    chosen = {k: (dimensions.get(k) or v) for k, v in defaults.items()}
    traces = list(traces)
    cells = [
        Cell(size=size, dirty_pct=None, bandwidth=bandwidth, pattern="replay", tracker=tracker,
             auto_converge=auto_converge, sweep="replay", trace=path)
        for (path, size), tracker, bandwidth in itertools.product(traces, chosen["trackers"], chosen["bandwidths"])
    ]
    if not traces or any(dimensions.get(k) for k in SYNTHETIC):
        cells += product(**chosen, sweep="custom", auto_converge=auto_converge)
    return replace(base, name="custom", cells=tuple(cells))


# --- parsing command-line lists ---------------------------------------------------------------


def parse_list(text: str, item) -> list:
    """``"a,b,c"`` -> [item(a), item(b), item(c)]; ValueError naming the bad element."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            values.append(item(part))
        except (ValueError, MigratorError) as exc:
            raise ValueError(f"bad value {part!r} ({exc})") from None
    return values


def parse_bandwidth(text: str) -> float | None:
    """``unlimited`` -> None; otherwise what ``migrate --bandwidth`` takes (100M, 1G, 500mbit)."""
    if text.strip().lower() in ("unlimited", "none"):
        return None
    return parse_link_rate(text)


def parse_dirty_percent(text: str) -> float | None:
    """``5`` or ``5%`` -> 5.0 (% of pages per second); ``unlimited`` -> None (as fast as it can)."""
    if text.strip().lower() == "unlimited":
        return None
    rate = float(text.strip().removesuffix("%"))
    if not rate > 0:
        raise ValueError("must be > 0 % of pages per second")
    return rate


def parse_pattern(text: str) -> str:
    return str(Pattern.parse(text.strip()))


def parse_tracker(text: str) -> str:
    if text not in TRACKERS:
        raise ValueError(f"choose from {', '.join(TRACKERS)}")
    return text
