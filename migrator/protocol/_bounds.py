"""Bounds-checking page runs against a Layout: every address the peer names must be inside it.

A batch holds up to thousands of runs, so it is checked in one native pass over its packed
words (``runs_check``, migrator/native/pages.c): page counts, alignment, one region per run, and
the total. Only a refused batch is looked at again here, to name the run and what is wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.errors import LocalProtocolError
from ..core.model import Run
from ..core.runs import words
from ..native.pages import ffi, lib

if TYPE_CHECKING:
    from .events import Layout

U32 = (1 << 32) - 1   # the most pages a run may hold (and any u32 field)


class LayoutBounds:
    def __init__(self, layout: Layout) -> None:
        self.page_size = layout.page_size
        flat, first = [], 0
        for region in layout.regions:
            flat += [region.start, region.length, first]
            first += region.length // layout.page_size
        self._regions = ffi.new("uint64_t[]", flat or [0])
        self._nregions = len(layout.regions)
        self._pages = first

    def check(self, runs: tuple[Run, ...]) -> int:
        """Total pages of ``runs``; raises LocalProtocolError naming the first run outside."""
        return check_runs(runs, self._regions, self._nregions, self.page_size, self._pages)


def check_runs(runs: tuple[Run, ...], regions=ffi.NULL, nregions: int = 0, page_size: int = 1, pages: int = 0) -> int:
    """Total pages of ``runs``, each of 1 to U32 pages and, given ``regions`` ((start, length,
    first page index) words), page-aligned inside one of them; LocalProtocolError otherwise
    (also for a value that is not a 64-bit unsigned integer)."""
    if not runs:
        return 0
    try:
        pairs = words(runs)
    except (OverflowError, TypeError):
        raise LocalProtocolError("addresses and page counts must be 64-bit unsigned ints") from None
    total = ffi.new("uint64_t *")
    bad = lib.runs_check(regions, nregions, page_size, pages, U32, ffi.from_buffer("uint64_t[]", pairs),
                         len(pairs) // 2, total)
    if bad == len(pairs) // 2:
        return total[0]
    address, count = pairs[2 * bad], pairs[2 * bad + 1]
    if not 1 <= count <= U32:
        raise LocalProtocolError(f"page run {address:#x} +{count}: page counts must be in [1, {U32}]")
    if address % page_size:
        raise LocalProtocolError(f"page run {address:#x} +{count} is not aligned to the {page_size}-byte page size")
    raise LocalProtocolError(f"page run {address:#x} +{count} outside layout")
