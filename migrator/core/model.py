"""Plain values shared by every layer (no I/O here): pages, runs, regions, layouts.

A *run* is ``(address, page_count)``: consecutive pages starting at ``address``. Trackers return
lists of runs, the codec carries them, the destination applies them. Addresses are the guest's
virtual addresses on the source; the destination translates them through the layout.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

PAGE_SIZE = 4096

Run = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Region:
    """One contiguous mapping of the guest, in the guest's address space."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    def contains(self, address: int, length: int) -> bool:
        return self.start <= address and address + length <= self.end


@dataclass(frozen=True, slots=True)
class MemoryLayout:
    """What a guest's migratable memory looks like: who, where, and in which page size (the wire's
    ``protocol.Layout`` event announces it without the pid)."""

    pid: int
    page_size: int
    regions: tuple[Region, ...]

    @property
    def total_bytes(self) -> int:
        return sum(r.length for r in self.regions)

    @property
    def total_pages(self) -> int:
        return self.total_bytes // self.page_size

    def _locate(self, runs: list[Run]) -> list[int]:
        """Region number of each run (runs never straddle regions)."""
        if len(self.regions) == 1:
            region = self.regions[0]
            if runs and not (region.start <= min(a for a, _ in runs) and max(a for a, _ in runs) < region.end):
                raise ValueError(f"a run of {len(runs)} lies outside the layout [{region.start:#x}, {region.end:#x})")
            return [0] * len(runs)
        starts = [r.start for r in self.regions]
        out = []
        for address, _ in runs:
            i = bisect.bisect_right(starts, address) - 1
            if i < 0 or address >= self.regions[i].end:
                raise ValueError(f"address {address:#x} is outside the layout")
            out.append(i)
        return out

    def page_indices(self, runs: list[Run]) -> list[tuple[int, int]]:
        """Address runs -> (page index counted across all regions, count) runs."""
        ps = self.page_size
        firsts, total = [], 0
        for r in self.regions:
            firsts.append(total - r.start // ps)
            total += r.length // ps
        where = self._locate(runs)
        return [(firsts[i] + address // ps, count) for i, (address, count) in zip(where, runs)]

    def translate(self, runs: list[Run], onto: "MemoryLayout") -> list[Run]:
        """Map runs of this layout onto the same offsets of ``onto`` (same shape, other addresses)."""
        shift = [o.start - r.start for r, o in zip(self.regions, onto.regions)]
        where = self._locate(runs)
        return [(address + shift[i], count) for i, (address, count) in zip(where, runs)]

    def same_shape(self, other: "MemoryLayout") -> bool:
        return self.page_size == other.page_size and [r.length for r in self.regions] == [
            r.length for r in other.regions
        ]

