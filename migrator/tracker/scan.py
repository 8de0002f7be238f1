"""PAGEMAP_SCAN walks turned into sorted, coalesced page runs.

One ioctl reports *regions* (start, end, categories) of pages matching a category filter, and may
stop early (output vector full, or ~512 regions reported internally); the caller must call again
for the rest. This module owns that loop, including the ``walk_end`` quirk seen on Linux 6.18
(see /work/shared/kernel-abi.md): after many regions ``walk_end`` can come back short of ``end``
although everything up to the end of the last returned region was reported, so re-scanning from
``walk_end`` would report pages twice (without WP_MATCHING) or waste a walk. The rule used here:
the next call starts at ``max(walk_end, end of the last region returned)``; the loop ends when that
reaches ``end``.

The vector is converted to runs per region (never per page) with C-speed slicing of the raw
``u64`` array; regions that touch across calls or across tracked regions are merged.
"""

from __future__ import annotations

import errno
import functools
import threading
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import NamedTuple

from ..core.model import Region, Run
from . import _sys
from ._uapi import ffi

PAGE_REGION_WORDS = 3  # struct page_region { u64 start, end, categories; }
DEFAULT_VEC_LEN = 8192  # 192 KiB of output; a 1 GiB region at 1 % scattered writes fits in one call
PARALLEL_SCAN_BYTES = 2 << 30   # regions this large or larger are walked by two threads (Scanner)


def new_vec(vec_len: int = DEFAULT_VEC_LEN):
    """An output vector for ``scan_runs``; reuse it across calls (one per tracker)."""
    if vec_len < 1:
        raise ValueError(f"vec_len must be at least 1, not {vec_len}")
    return ffi.new("struct page_region[]", vec_len)


def append_regions(runs: list[Run], vec, count: int, page_shift: int, *, may_touch: bool) -> tuple[int, int]:
    """Append ``count`` regions of ``vec`` to ``runs`` as (address, pages), merging touching ones.

    Returns (pages appended, end of the last region). The kernel already merges adjacent pages
    whose reported categories are equal, so regions of one call touch only when the reported
    categories can differ (``may_touch``); the seam with the previous call or tracked region is
    checked once per call. No Python loop runs per region on the usual path: ~55 ns per region
    (mostly building its tuple), against ~85 ns for a list comprehension; 1 GiB at 1 % scattered
    writes is ~2,600 regions, and collect() must stay within 2x the bare ioctl (~0.3-0.5 ms).
    """
    words = memoryview(ffi.buffer(vec, count * PAGE_REGION_WORDS * 8)).cast("Q")
    starts, ends = words[0::PAGE_REGION_WORDS], words[1::PAGE_REGION_WORDS]
    if may_touch:
        start_list, end_list = _merge_touching(starts.tolist(), ends.tolist())
        counts = [(e - s) >> page_shift for s, e in zip(start_list, end_list)]
    else:
        start_list, counts = starts.tolist(), page_counts(starts, ends, page_shift)
    first = int(join_seam(runs, start_list[0], counts[0], page_shift))
    runs.extend(zip(islice(start_list, first, None), islice(counts, first, None)))
    return sum(counts), start_list[-1] + (counts[-1] << page_shift)


def join_seam(runs: list[Run], address: int, pages: int, page_shift: int) -> bool:
    """Extend the last of ``runs`` by the run (``address``, ``pages``) when it starts where that
    one ends (the seam between two walks or two calls); whether it did."""
    if runs:
        last_address, last_pages = runs[-1]
        if last_address + (last_pages << page_shift) == address:
            runs[-1] = (last_address, last_pages + pages)
            return True
    return False


def page_counts(starts: memoryview, ends: memoryview, page_shift: int) -> list[int]:
    """``(end - start) >> page_shift`` for every region, without a Python loop.

    Starts and ends (u64 memoryviews) become two big integers of 64-bit little-endian lanes.
    Every end is at or above its start, so the subtraction never borrows across lanes; every
    difference is a multiple of the page size, so shifting the whole integer right moves only
    zero bits into the lane below.
    """
    lengths = int.from_bytes(ends.tobytes(), "little") - int.from_bytes(starts.tobytes(), "little")
    return memoryview((lengths >> page_shift).to_bytes(len(starts) * 8, "little")).cast("Q").tolist()


def _merge_touching(starts: list[int], ends: list[int]) -> tuple[list[int], list[int]]:
    """Join regions where one ends exactly where the next starts (mixed reported categories)."""
    if not any(map(int.__eq__, ends[:-1], starts[1:])):
        return starts, ends
    merged_starts, merged_ends = [starts[0]], [ends[0]]
    for s, e in zip(starts[1:], ends[1:]):
        if s == merged_ends[-1]:
            merged_ends[-1] = e
        else:
            merged_starts.append(s)
            merged_ends.append(e)
    return merged_starts, merged_ends


def categories_may_differ(category_mask: int, return_mask: int) -> bool:
    """True when matched pages can report different categories (so regions may touch).

    Every bit of ``category_mask`` has one fixed value on matched pages; only return bits outside
    it can vary.
    """
    return bool(return_mask & ~category_mask)


def scan_runs(
    pagemap_fd: int,
    start: int,
    end: int,
    *,
    flags: int,
    category_mask: int = 0,
    anyof: int = 0,
    inverted: int = 0,
    return_mask: int = 0,
    vec,
    vec_len: int,
    page_size: int = 4096,
    runs: list[Run] | None = None,
) -> ScanResult:
    """Walk ``[start, end)`` with PAGEMAP_SCAN until done.

    ``runs`` (when given) is extended in place, merging with its last run where they touch.
    ``vec=ffi.NULL, vec_len=0`` walks without output (only WP_MATCHING has an effect then).
    Raises ``OSError`` naming PAGEMAP_SCAN, the range and the errno.
    """
    if runs is None:
        runs = []
    arg = _sys.pagemap_scan_arg(vec, vec_len, flags=flags, category_mask=category_mask,
                                category_anyof_mask=anyof, category_inverted=inverted, return_mask=return_mask)
    page_shift = page_size.bit_length() - 1
    may_touch = categories_may_differ(category_mask, return_mask)
    ioctls = pages = 0
    position = start
    while position < end:
        count, walk_end = _sys.pagemap_scan_with(pagemap_fd, arg, position, end)
        ioctls += 1
        next_position = walk_end
        if count:
            added, last_end = append_regions(runs, vec, count, page_shift, may_touch=may_touch)
            pages += added
            next_position = max(walk_end, last_end)
        if next_position <= position:
            raise OSError(
                errno.EIO,
                f"PAGEMAP_SCAN [{position:#x}, {end:#x}) made no progress (walk_end={walk_end:#x})",
            )
        position = next_position
    return ScanResult(runs, pages, ioctls)


class ScanResult(NamedTuple):
    runs: list[Run]
    pages: int   # pages in the regions this walk reported
    ioctls: int


def halves(regions: Sequence[Region], page_size: int) -> tuple[list[Region], list[Region]]:
    """``regions`` cut at a page boundary into two lists of about equal bytes, in order."""
    total = sum(r.length for r in regions)
    goal = total // 2 // page_size * page_size
    first: list[Region] = []
    second: list[Region] = []
    seen = 0
    for region in regions:
        if seen >= goal:
            second.append(region)
        elif seen + region.length <= goal:
            first.append(region)
        else:
            cut = goal - seen
            first.append(Region(region.start, cut))
            second.append(Region(region.start + cut, region.length - cut))
        seen += region.length
    return first, second


class Scanner:
    """A pagemap fd plus reusable output vectors; scans lists of regions. Not thread-safe.

    Regions of ``PARALLEL_SCAN_BYTES`` or more are walked in two halves at once, the second on a
    helper thread with a vector of its own: the walk of the page tables is the final scan's
    whole cost, it grows with the region, and it sits inside the downtime, when the guest is
    frozen and both CPUs are free (4 GiB: 2.7 ms in one walk, 1.8 ms in two, measured here).
    Smaller regions are walked in one: a thread's start costs more than it saves there."""

    def __init__(self, pagemap_fd: int, *, page_size: int = 4096, vec_len: int = DEFAULT_VEC_LEN) -> None:
        self.pagemap_fd = pagemap_fd
        self.page_size = page_size
        self.vec_len = vec_len
        self._vec = new_vec(vec_len)
        self._helper_vec = None          # the second half's, made when first needed
        self.ioctls = 0
        self.last_pages = 0  # pages in the runs the last scan() returned

    def scan(self, regions: Iterable[Region], *, flags: int, category_mask: int = 0, anyof: int = 0,
             inverted: int = 0, return_mask: int = 0, with_output: bool = True) -> list[Run]:
        """Runs of matching pages over ``regions`` (sorted, non-overlapping), merged across them.

        ``with_output=False`` passes no vector at all: the walk only applies WP_MATCHING (used to
        arm: the kernel's fast path protects every page) and returns ``[]``.
        """
        regions = list(regions)
        walk = functools.partial(self._walk, flags=flags, category_mask=category_mask, anyof=anyof,
                                 inverted=inverted, return_mask=return_mask, with_output=with_output)
        if sum(r.length for r in regions) < PARALLEL_SCAN_BYTES:
            runs, pages, ioctls = walk(regions, self._vec)
        else:
            if self._helper_vec is None:
                self._helper_vec = new_vec(self.vec_len)
            first, second = halves(regions, self.page_size)
            later: list = []

            def helper() -> None:
                try:
                    later.append(walk(second, self._helper_vec))
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
                    later.append(exc)

            thread = threading.Thread(target=helper, name="pagemap-scan")
            thread.start()
            try:
                runs, pages, ioctls = walk(first, self._vec)
            finally:
                thread.join()
            if isinstance(later[0], BaseException):
                raise later[0]
            more, more_pages, more_ioctls = later[0]
            if more and join_seam(runs, *more[0], self.page_size.bit_length() - 1):   # a run across the cut
                more = more[1:]
            runs += more
            pages, ioctls = pages + more_pages, ioctls + more_ioctls
        self.ioctls += ioctls
        self.last_pages = pages
        return runs

    def _walk(self, regions: list[Region], vec, *, flags: int, category_mask: int, anyof: int, inverted: int,
              return_mask: int, with_output: bool) -> tuple[list[Run], int, int]:
        runs: list[Run] = []
        vec, vec_len = (vec, self.vec_len) if with_output else (ffi.NULL, 0)
        pages = ioctls = 0
        for region in regions:
            result = scan_runs(
                self.pagemap_fd, region.start, region.end, flags=flags, category_mask=category_mask,
                anyof=anyof, inverted=inverted, return_mask=return_mask, vec=vec, vec_len=vec_len,
                page_size=self.page_size, runs=runs,
            )
            ioctls += result.ioctls
            pages += result.pages
        return runs, pages, ioctls
