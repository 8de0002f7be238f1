"""Bounds-checking page runs against a Layout: every address the peer names must be inside it.

A batch holds up to thousands of runs. The common case (every run inside one region) is decided
from the batch's lowest start and highest end, computed by C-level passes; only a batch that
spans regions is checked run by run.
"""

from __future__ import annotations

from bisect import bisect_right
from functools import reduce
from itertools import repeat
from operator import add, mul, or_

from ..core.errors import LocalProtocolError
from ..core.model import Run
from .events import Layout


class LayoutBounds:
    def __init__(self, layout: Layout) -> None:
        self.page_size = layout.page_size
        self._starts = [r.start for r in layout.regions]
        self._ends = [r.end for r in layout.regions]

    def check(self, runs: tuple[Run, ...]) -> int:
        """Total pages of ``runs``; raises LocalProtocolError naming the first run outside."""
        ps = self.page_size
        addresses, counts = zip(*runs)
        if reduce(or_, addresses) & (ps - 1):
            bad = next((a, n) for a, n in runs if a & (ps - 1))
            raise LocalProtocolError(f"page run {bad[0]:#x} +{bad[1]} is not aligned to the {ps}-byte page size")
        ends = list(map(add, addresses, map(mul, counts, repeat(ps))))
        first = bisect_right(self._starts, min(addresses)) - 1
        if first < 0 or max(ends) > self._ends[first]:
            for (address, count), end in zip(runs, ends):
                i = bisect_right(self._starts, address) - 1
                if i < 0 or end > self._ends[i]:
                    raise LocalProtocolError(f"page run {address:#x} +{count} outside layout")
        return sum(counts)
