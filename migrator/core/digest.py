"""Digests: per page of what was sent and applied, and of a whole region.

Per-page digests record what was sent (source) and what was applied (destination).

``--verify pages`` compares the two tables at switchover: cheap (each side hashes a page once per
time it moves it, in C without the GIL, off the critical path, and keeps the table's digest, two
sums over its entries, current as it goes) and it catches corruption in transport and mistakes
in applying (a page written to the wrong place lands at another index).
Pages never sent read as zero on both sides, so every entry starts as the digest of a zero page.

The region digest (``--verify full``, the guest's ``digest`` command) is a hash list: xxh3-128
of the xxh3-128 digests of the region's consecutive 64 MiB pieces. One streaming hash over the
region would keep one core busy while the guest is frozen; pieces let every core take a share.
"""

from __future__ import annotations

import array
import functools
import os
import struct
import threading
from collections.abc import Callable

import xxhash

from ..native.pages import ffi, lib
from .model import MemoryLayout, Run
from .runs import count_pages, words


def new_hashes(pages: int) -> array.array:
    """Room for ``pages`` page hashes, as ``hash_pages_into`` and hashing transfers fill it."""
    return array.array("Q", bytes(8 * pages))


def hash_pages_into(buf, pages: int, page_size: int, hashes: array.array) -> None:
    """``hashes[i]`` = the digest table's hash of ``buf``'s page ``i``, for ``pages`` pages (one
    native pass without the GIL); ValueError when ``hashes`` or ``buf`` is too short or long."""
    if len(hashes) != pages or len(buf) < pages * page_size:
        raise ValueError(f"{len(hashes)} hashes for {pages} pages")
    lib.hash_pages(ffi.from_buffer(buf), pages, page_size, ffi.from_buffer("uint64_t[]", hashes))


class PageDigests:
    """One 64-bit hash per page of a layout, indexed by page number from the layout's start, and
    the table's digest, updated with every entry (in C), so ``value`` inside a downtime costs
    the same for any region size. Recording is thread-safe: the running sum is updated entry by
    entry, so two unserialised recorders (post-copy's push and its requests) would corrupt it."""

    def __init__(self, total_pages: int, page_size: int = 4096) -> None:
        self.page_size = page_size
        self._lock = threading.Lock()
        self._sum = ffi.new("uint64_t[2]")
        one = new_hashes(1)
        hash_pages_into(bytes(page_size), 1, page_size, one)
        self.zero = one[0]
        self.table = one * total_pages
        lib.page_hashes_sum(self._table(), total_pages, self._sum)

    def load(self, table: array.array) -> None:
        """Start from another table of as many pages (an incremental image's parent's)."""
        if len(table) != len(self.table):
            raise ValueError(f"a table of {len(table)} pages for {len(self.table)}")
        self.table = array.array("Q", table)
        lib.page_hashes_sum(self._table(), len(self.table), self._sum)

    def _table(self):
        return ffi.from_buffer("uint64_t[]", self.table)

    def record_runs(self, layout: MemoryLayout, runs: list[Run], payload=None) -> None:
        """Hash the pages of ``runs`` (address, count) of ``layout``, taken from ``payload`` in
        order, or record them as zero pages without one. Native passes; ValueError names a run
        outside the layout. The pages are hashed before the lock is taken, so another recorder
        waits only for the entries to be set."""
        if not runs:
            return
        pages = count_pages(runs)
        if payload is None:
            self._record(layout, runs, None)
            return
        if len(payload) != pages * self.page_size:
            raise ValueError(f"{len(payload)} bytes for {pages} pages")
        hashes = new_hashes(pages)
        hash_pages_into(payload, pages, self.page_size, hashes)
        self._record(layout, runs, hashes)

    def record_hashes(self, layout: MemoryLayout, runs: list[Run], hashes: array.array) -> None:
        """Record the pages of ``runs`` with their ``hashes`` (one per page, in order), as a
        transfer that hashed them while it moved them computed them (``tracker.memory``)."""
        if len(hashes) != count_pages(runs):
            raise ValueError(f"{len(hashes)} hashes for {count_pages(runs)} pages")
        if runs:
            self._record(layout, runs, hashes)

    def _record(self, layout: MemoryLayout, runs: list[Run], hashes: array.array | None) -> None:
        """Set the entries of ``runs``: from ``hashes``, or (None) as zero pages."""
        pairs = words(runs)
        given = ffi.from_buffer("uint64_t[]", hashes) if hashes is not None else ffi.NULL
        with self._lock:
            done = lib.page_hashes_at(ffi.from_buffer("uint64_t[]", pairs), len(runs), region_table(layout),
                                      len(layout.regions), self.page_size, self.zero, given,
                                      self._table(), len(self.table), self._sum)
        if done != len(runs):
            address, count = runs[done]
            raise ValueError(f"pages {address:#x}+{count} lie outside the layout")

    def record_indexed(self, pairs, n: int) -> int:
        """Set the entries named by ``n`` (page index, hash) pairs of ``pairs`` (a cffi
        ``uint64_t[]``: post-copy's native loops log the pages they moved so). Returns ``n``,
        or the index of the first pair outside the table (none is set from it on)."""
        with self._lock:
            return lib.page_hashes_indexed(pairs, n, self._table(), len(self.table), self._sum)

    def value(self) -> bytes:
        """A digest of the whole table: equal tables, equal values (16 bytes)."""
        return struct.pack("<QQ", self._sum[0], self._sum[1])


@functools.lru_cache(maxsize=16)
def region_table(layout: MemoryLayout):
    """(start, length, first page index) per region, as page_hashes_at reads them."""
    flat, first = [], 0
    for region in layout.regions:
        flat += [region.start, region.length, first]
        first += region.length // layout.page_size
    return ffi.new("uint64_t[]", flat)


REGION_PIECE = 64 << 20          # bytes per piece of a region digest
REGION_THREADS = min(4, os.cpu_count() or 1)


def region_pieces(length: int) -> list[tuple[int, int]]:
    """(offset, size) of each piece of a region of ``length`` bytes, in order."""
    return [(offset, min(REGION_PIECE, length - offset)) for offset in range(0, length, REGION_PIECE)]


def hash_region(length: int, hash_piece: Callable[[int, int], bytes], threads: int = REGION_THREADS) -> bytes:
    """The region digest, ``hash_piece(offset, size)`` giving each piece's xxh3-128 digest.

    Pieces are shared out among ``threads`` threads (xxhash and process_vm_readv release the
    GIL); the first failure is raised once all threads stopped.
    """
    pieces = region_pieces(length)
    digests: list[bytes | None] = [None] * len(pieces)
    failures: list[BaseException] = []

    def work(first: int) -> None:
        try:
            for i in range(first, len(pieces), threads):
                digests[i] = hash_piece(*pieces[i])
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            failures.append(exc)

    workers = [threading.Thread(target=work, args=(k,), name="region-digest") for k in range(1, min(threads, len(pieces)))]
    for worker in workers:
        worker.start()
    work(0)
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]
    return xxhash.xxh3_128_digest(b"".join(digests))


def region_digest_read(length: int, read: Callable[[int, memoryview], None], chunk: int = 1 << 20) -> bytes:
    """The region digest of memory this process can only copy (another process's):
    ``read(offset, view)`` fills ``view`` with the region's bytes at ``offset``. Each thread
    reads its pieces ``chunk`` bytes at a time into one small buffer, which stays in the cache
    while it is hashed (reading into large buffers costs twice as much here)."""

    def hash_piece(offset: int, size: int) -> bytes:
        buffer = memoryview(bytearray(chunk))
        piece = xxhash.xxh3_128()
        for at in range(offset, offset + size, chunk):
            view = buffer[: min(chunk, offset + size - at)]
            read(at, view)
            piece.update(view)
        return piece.digest()

    return hash_region(length, hash_piece)


def region_digest(buffer) -> bytes:
    """The region digest of bytes in this process's memory."""
    view = memoryview(buffer).cast("B")
    return hash_region(len(view), lambda offset, size: xxhash.xxh3_128_digest(view[offset : offset + size]))
