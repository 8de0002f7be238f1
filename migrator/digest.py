"""Per-page digests of what was sent (source) and of what was applied (destination).

``--verify pages`` compares the two tables at switchover: cheap (each side hashes a page once per
time it moves it, in C without the GIL, off the critical path) and it catches corruption in
transport and mistakes in applying (a page written to the wrong place lands at another index).
Pages never sent read as zero on both sides, so every entry starts as the digest of a zero page.
"""

from __future__ import annotations

import array
from itertools import chain

import xxhash

from ._native import ffi, lib


def _hash_into(table: array.array, indices: list[tuple[int, int]], payload, page_size: int) -> None:
    """table[first + i] = hash of the i-th page of each run, pages taken from ``payload`` in order."""
    pairs = array.array("Q", chain.from_iterable(indices))
    lib.page_hashes(
        ffi.from_buffer(payload), ffi.from_buffer("uint64_t[]", pairs), len(indices), page_size,
        ffi.from_buffer("uint64_t[]", table), len(table),
    )


class PageDigests:
    """One 64-bit hash per page of a layout, indexed by page number from the layout's start."""

    def __init__(self, total_pages: int, page_size: int = 4096) -> None:
        self.page_size = page_size
        one = array.array("Q", [0])
        _hash_into(one, [(0, 1)], bytes(page_size), page_size)
        self.zero = one[0]
        self.table = one * total_pages

    def record(self, indices: list[tuple[int, int]], payload) -> None:
        """Hash the pages of ``payload``; ``indices`` are (first page index, count) in order."""
        pages = sum(n for _, n in indices)
        if len(payload) != pages * self.page_size:
            raise ValueError(f"{len(payload)} bytes for {pages} pages")
        if indices:
            _hash_into(self.table, indices, payload, self.page_size)

    def record_zero(self, indices: list[tuple[int, int]]) -> None:
        for first, count in indices:
            self.table[first : first + count] = array.array("Q", [self.zero]) * count

    def value(self) -> bytes:
        """A digest of the whole table: equal tables, equal values."""
        return xxhash.xxh3_128_digest(self.table.tobytes())
