"""Plain values shared by every layer (no I/O here).

A *run* is ``(address, page_count)``: consecutive pages starting at ``address``. Trackers return
lists of runs, the codec carries them, the destination applies them. Addresses are the guest's
virtual addresses on the source; the destination translates them through the layout.
"""

from __future__ import annotations

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
class Layout:
    """What a guest's migratable memory looks like: who, where, and in which page size."""

    pid: int
    page_size: int
    regions: tuple[Region, ...]

    @property
    def total_bytes(self) -> int:
        return sum(r.length for r in self.regions)

    @property
    def total_pages(self) -> int:
        return self.total_bytes // self.page_size


def run_pages(runs: list[Run]) -> int:
    """Number of pages in ``runs``."""
    return sum(n for _, n in runs)
