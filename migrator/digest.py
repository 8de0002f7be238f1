"""Per-page digests of what was sent (source) and of what was applied (destination).

``--verify pages`` compares the two tables at switchover: cheap (each side hashes a page once per
time it moves it, off the critical path) and it catches corruption in transport and mistakes in
applying (a page written to the wrong place lands at another index). Pages never sent read as
zero on both sides, so every entry starts as the digest of a zero page.
"""

from __future__ import annotations

import array

import xxhash

_hash_page = xxhash.xxh3_64_intdigest


class PageDigests:
    """One 64-bit xxh3 per page of a layout, indexed by page number from the layout's start."""

    def __init__(self, total_pages: int, page_size: int = 4096) -> None:
        self.page_size = page_size
        self.zero = _hash_page(bytes(page_size))
        self.table = array.array("Q", [self.zero]) * total_pages

    def record(self, indices: list[tuple[int, int]], payload) -> None:
        """Hash the pages of ``payload``; ``indices`` are (first page index, count) in order."""
        view = memoryview(payload)
        ps = self.page_size
        table = self.table
        offset = 0
        for first, count in indices:
            end = offset + count * ps
            table[first : first + count] = array.array(
                "Q", map(_hash_page, (view[o : o + ps] for o in range(offset, end, ps)))
            )
            offset = end

    def record_zero(self, indices: list[tuple[int, int]]) -> None:
        for first, count in indices:
            self.table[first : first + count] = array.array("Q", [self.zero]) * count

    def value(self) -> bytes:
        """A digest of the whole table: equal tables, equal values."""
        return xxhash.xxh3_128_digest(self.table.tobytes())
