"""Helpers over page runs ``(address, page_count)``: batching, complements, unions (the union's
merge is native: ``migrator.native.pages``)."""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator, Sequence
from itertools import accumulate, chain
from operator import itemgetter

from ..native.pages import ffi, lib
from .model import Region, Run


def split_runs(runs: Sequence[Run], max_pages: int, max_runs: int, page_size: int = 4096) -> Iterator[list[Run]]:
    """Cut ``runs`` into batches of at most ``max_pages`` pages and ``max_runs`` runs, in order.

    A run longer than the room left in a batch is cut across batches. Batching bounds frame size
    and the iovec count of one process_vm_readv call (IOV_MAX). Whole runs are taken by slicing
    at cut points found by bisection over page-count prefix sums: late rounds hold tens of
    thousands of one-page runs, and a per-run Python loop would cost more than moving them.
    """
    runs = runs if isinstance(runs, list) else list(runs)
    cum = list(accumulate(map(itemgetter(1), runs)))
    i = 0          # next run to place
    done = 0       # pages of runs[i] already placed (a run cut across batches)
    placed = 0     # pages placed so far, all runs
    while i < len(runs):
        batch: list[Run] = []
        limit = placed + max_pages
        if done:
            address, count = runs[i]
            take = min(count - done, max_pages)
            batch.append((address + done * page_size, take))
            placed += take
            done += take
            if done == count:
                i, done = i + 1, 0
        if placed < limit and len(batch) < max_runs and i < len(runs):
            j = min(bisect.bisect_right(cum, limit, lo=i), i + max_runs - len(batch))
            if j > i:
                batch.extend(runs[i:j])
                placed = cum[j - 1]
                i = j
            if placed < limit and len(batch) < max_runs and i < len(runs):
                address, count = runs[i]
                done = limit - placed
                batch.append((address, done))
                placed = limit
        yield batch


def complement(regions: Sequence[Region], runs: Sequence[Run], page_size: int = 4096) -> list[Run]:
    """The pages of ``regions`` not covered by sorted, non-overlapping ``runs``."""
    out: list[Run] = []
    i = 0
    for region in regions:
        cursor = region.start
        while i < len(runs) and runs[i][0] < region.end:
            address, count = runs[i]
            if address > cursor:
                out.append((cursor, (address - cursor) // page_size))
            cursor = max(cursor, address + count * page_size)
            i += 1
        if cursor < region.end:
            out.append((cursor, (region.end - cursor) // page_size))
    return out


def union(a: Sequence[Run], b: Sequence[Run], page_size: int = 4096) -> list[Run]:
    """Sorted, coalesced union of two run lists (pages in both appear once). The final copy's
    merge sits inside the downtime: run lists sorted by address (what trackers return) are
    merged in one linear native pass; anything else is sorted here."""
    out = ffi.new("uint64_t[]", 2 * (len(a) + len(b)))
    try:
        n = lib.runs_union(ffi.new("uint64_t[]", [*chain.from_iterable(a)]), len(a),
                           ffi.new("uint64_t[]", [*chain.from_iterable(b)]), len(b), page_size, out)
    except (OverflowError, TypeError):     # a value past 64 bits, or negative: Python's integers
        n = lib.RUNS_UNSORTED
    if n == lib.RUNS_UNSORTED:
        return _sorted_union(a, b, page_size)
    pairs = iter(ffi.unpack(out, 2 * n))
    return list(zip(pairs, pairs))


def _sorted_union(a: Sequence[Run], b: Sequence[Run], page_size: int) -> list[Run]:
    spans = sorted((addr, addr + n * page_size) for addr, n in [*a, *b] if n)
    out: list[list[int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(start, (end - start) // page_size) for start, end in out]


def count_pages(runs: Sequence[Run]) -> int:
    return sum(map(itemgetter(1), runs))


class Runs(tuple):
    """Page runs on the data path: a tuple of ``(address, page_count)`` pairs that also holds the
    same pairs as native 64-bit words (``packed``), made once per batch.

    Every native pass over a batch (reading and writing it across processes, hashing its pages,
    checking it against the Layout, putting it on the wire) takes those words. Packing a tuple of
    tuples costs more per run than some of those passes, and a batch went through five of them;
    now it is packed once on the source (``pack``) and never on the destination, which reads the
    words off the wire (``from_words``). Make them with those two only.
    """

    packed: array

    @classmethod
    def pack(cls, runs: Sequence[Run]) -> Runs:
        if type(runs) is cls:
            return runs
        made = cls(runs)
        made.packed = array("Q", chain.from_iterable(made))
        return made

    @classmethod
    def from_words(cls, words: array) -> Runs:
        """Runs of ``words`` (an ``array('Q')`` of address, count, address, count...)."""
        pairs = iter(words)
        made = cls(zip(pairs, pairs))      # one pass, no sliced copies: a scattered batch has 1024 runs
        made.packed = words
        return made


def words(runs: Sequence[Run]) -> array:
    """The runs as native 64-bit words: a ``Runs``' own, else packed now (``OverflowError`` or
    ``TypeError`` for a value that is not a 64-bit unsigned integer)."""
    if type(runs) is Runs:
        return runs.packed
    return array("Q", chain.from_iterable(runs))
