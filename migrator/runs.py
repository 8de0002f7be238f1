"""Pure helpers over page runs ``(address, page_count)``: batching, complements, unions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .model import Region, Run


def split_runs(runs: Sequence[Run], max_pages: int, max_runs: int, page_size: int = 4096) -> Iterator[list[Run]]:
    """Cut ``runs`` into batches of at most ``max_pages`` pages and ``max_runs`` runs, in order.

    A run longer than a batch is cut across batches. Batching bounds frame size and the iovec
    count of one process_vm_readv call (IOV_MAX).
    """
    batch: list[Run] = []
    pages = 0
    for address, count in runs:
        while count:
            take = min(count, max_pages - pages)
            batch.append((address, take))
            pages += take
            address += take * page_size
            count -= take
            if pages == max_pages or len(batch) == max_runs:
                yield batch
                batch, pages = [], 0
    if batch:
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
    """Sorted, coalesced union of two run lists (pages in both appear once)."""
    spans = sorted((addr, addr + n * page_size) for addr, n in [*a, *b] if n)
    out: list[list[int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(start, (end - start) // page_size) for start, end in out]


def count_pages(runs: Sequence[Run]) -> int:
    return sum(n for _, n in runs)
