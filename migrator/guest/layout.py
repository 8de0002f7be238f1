"""Pure values describing a guest region: its geometry, its settings, and its digest.

No I/O and not the guest's compiled hot loop here, so a migrator or a destination can size,
name and digest a region without it (the digest itself is ``migrator.core.digest``'s). The byte layout of the control block itself is defined once,
in C (``migrator/native/workload.h``); ``workload.py`` reads it through cffi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core import digest, units
from ..core.model import PAGE_SIZE

if TYPE_CHECKING:
    from .replay import ReplayPlan

PATTERNS = ("uniform", "hot", "sequential")
FILLS = ("random", "text", "sparse")
MIN_REGION_PAGES = 16
TABLE_ENTRIES_PER_PAGE = PAGE_SIZE // 8



def region_digest(buffer) -> str:
    """The region digest (``migrator.core.digest``) of a whole region's bytes, as hex: the one digest
    migrator, destination and guest compare (the guest's ``digest`` command returns it)."""
    return digest.region_digest(buffer).hex()


def parse_size(text: str) -> int:
    """A guest region's size (``"64M"``, ``"1G"``): a whole number of pages, at least 16."""
    return units.parse_size(text, min_pages=MIN_REGION_PAGES)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where the control block, version table and data pages sit (in pages from the start)."""

    region_pages: int
    table_pages: int
    data_pages: int

    schedule_pages: int = 0   # a replay's schedule, between the table and the data pages

    @classmethod
    def for_size(cls, size: int, schedule_pages: int = 0) -> Geometry:
        """Page 0 holds the control block, then the fewest table pages that index the data pages
        (what is left after the table and ``schedule_pages``)."""
        pages = size // PAGE_SIZE
        if size % PAGE_SIZE or pages < MIN_REGION_PAGES + schedule_pages:
            raise ValueError(f"region of {size} bytes: need a multiple of {PAGE_SIZE}, "
                             f"at least {MIN_REGION_PAGES + schedule_pages} pages")
        # table + data = pages - 1 - schedule, table * 512 >= data
        table = math.ceil((pages - 1 - schedule_pages) / (TABLE_ENTRIES_PER_PAGE + 1))
        return cls(region_pages=pages, table_pages=table, data_pages=pages - 1 - table - schedule_pages,
                   schedule_pages=schedule_pages)

    @classmethod
    def for_data(cls, data_pages: int, schedule_pages: int = 0) -> Geometry:
        """The smallest region with at least ``data_pages`` data pages after ``schedule_pages``."""
        table = math.ceil(data_pages / TABLE_ENTRIES_PER_PAGE)
        pages = max(1 + table + schedule_pages + data_pages, MIN_REGION_PAGES + schedule_pages)
        return cls.for_size(pages * PAGE_SIZE, schedule_pages)

    @property
    def first_data_page(self) -> int:
        return 1 + self.table_pages + self.schedule_pages

    @property
    def size(self) -> int:
        return self.region_pages * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class Pattern:
    """Which pages a step writes: ``uniform``, ``sequential``, or ``hot`` with ``share`` of the
    writes going to ``fraction`` of the pages (``hot:0.05:0.9``)."""

    kind: str = "uniform"
    fraction: float = 0.0
    share: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Pattern:
        kind, _, params = text.partition(":")
        if kind not in PATTERNS:
            raise ValueError(f"pattern {text!r}: expected uniform, sequential or hot:FRACTION:SHARE")
        if kind != "hot":
            if params:
                raise ValueError(f"pattern {text!r}: {kind} takes no parameters")
            return cls(kind)
        try:
            fraction, share = (float(x) for x in params.split(":"))
        except ValueError:
            raise ValueError(f"pattern {text!r}: expected hot:FRACTION:SHARE, e.g. hot:0.05:0.9") from None
        if not (0 < fraction < 1 and 0 <= share <= 1):
            raise ValueError(f"pattern {text!r}: need 0 < FRACTION < 1 and 0 <= SHARE <= 1")
        return cls(kind, fraction, share)

    def __str__(self) -> str:
        return f"hot:{self.fraction:g}:{self.share:g}" if self.kind == "hot" else self.kind

    def hot_parameters(self, data_pages: int) -> tuple[int, int, int]:
        """(hot pages, threshold on a u64 draw, stride of the page permutation) for the region.

        The hot set is scattered over the region: rank r maps to data page (r * stride) mod
        data_pages, with the stride coprime to data_pages so the map is a permutation.
        """
        if self.kind != "hot":
            return 0, 0, 0
        hot = min(data_pages - 1, max(1, round(self.fraction * data_pages)))
        threshold = min((1 << 64) - 1, int(self.share * (1 << 64)))
        stride = max(1, int(data_pages * 0.6180339887)) | 1
        while math.gcd(stride, data_pages) != 1:
            stride += 2
        return hot, threshold, stride % data_pages or 1


@dataclass(frozen=True, slots=True)
class Settings:
    """What a guest does; stored in its control block, so a restored guest reads them back."""

    pattern: Pattern = Pattern()
    fill: str = "random"
    seed: int = 1
    dirty_rate: float | None = None  # page writes per second; None = unlimited
    replay: ReplayPlan | None = None  # replay a trace instead of the pattern (and the rate)

    def __post_init__(self) -> None:
        if self.fill not in FILLS:
            raise ValueError(f"fill {self.fill!r}: expected one of {', '.join(FILLS)}")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError(f"seed {self.seed}: must be in [0, 2**64)")
        if self.dirty_rate is not None and not (0 < self.dirty_rate < math.inf):
            raise ValueError(f"dirty rate {self.dirty_rate}: must be a positive number of pages per second")
