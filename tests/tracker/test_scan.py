"""The PAGEMAP_SCAN walk loop: tiny vectors, >512 regions, the walk_end quirk, merging, errors."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tracker_helpers import PAGE, assert_coalesced, need, pages_of

from migrator.tracker import _sys, features
from migrator.tracker._uapi import (
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    ffi,
)
from migrator.tracker.handover import register_for_tracking
from migrator.core.model import Region
from migrator.tracker import scan as scan_module
from migrator.tracker.scan import Scanner, append_regions, halves, new_vec, scan_runs

TRACK = dict(flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, category_mask=PAGE_IS_WRITTEN,
             return_mask=PAGE_IS_WRITTEN)
POPULATED = dict(flags=0, category_mask=PAGE_IS_PFNZERO, inverted=PAGE_IS_PFNZERO,
                 anyof=PAGE_IS_PRESENT | PAGE_IS_SWAPPED, return_mask=0)


@pytest.fixture
def pagemap():
    need(features.pagemap_scan_missing())
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def scan(pagemap, memory, vec_len, **kwargs):
    runs, _, ioctls = scan_runs(pagemap, memory.start, memory.region.end, vec=new_vec(vec_len), vec_len=vec_len, **kwargs)
    assert_coalesced(runs)
    return pages_of(runs, memory.start), ioctls


# Every other page of 3000: 1500 one-page regions, well over the ~512 after which walk_end comes
# back short on 6.18 (and 4 contiguous pages at the end to check runs longer than one page).
SCATTERED = list(range(0, 3000, 2)) + [3001, 3002, 3003, 3004]


@pytest.mark.parametrize("vec_len", [1, 2, 3, 4096])
def test_populated_walk_reports_each_page_once(pagemap, own_memory, vec_len):
    memory = own_memory(3008)
    memory.write(SCATTERED)
    pages, ioctls = scan(pagemap, memory, vec_len, **POPULATED)
    assert pages == sorted(SCATTERED)
    if vec_len < 4:
        assert ioctls >= 1501 // vec_len  # the loop really went round


@pytest.mark.parametrize("vec_len", [1, 3, 4096])
def test_tracking_walk_with_tiny_and_large_vectors(pagemap, own_memory, vec_len):
    need(features.wp_async_missing())
    memory = own_memory(3008)
    uffd = register_for_tracking([memory.region], "async")
    try:
        memory.write(range(3008))
        scan(pagemap, memory, 4096, **TRACK)  # arm: reports and protects everything written
        memory.write(SCATTERED, value=9)
        pages, _ = scan(pagemap, memory, vec_len, **TRACK)
        assert pages == sorted(SCATTERED)
        assert scan(pagemap, memory, vec_len, **TRACK)[0] == []
    finally:
        os.close(uffd)


def test_regions_with_different_categories_are_merged(pagemap, own_memory):
    need(features.wp_async_missing())
    memory = own_memory(64)
    uffd = register_for_tracking([memory.region], "async")
    try:
        memory.write(range(64))
        scan(pagemap, memory, 16, **TRACK)
        memory.write(range(10, 21), value=3)
        # PRESENT everywhere, WRITTEN only on 10..20: three touching regions from the kernel.
        runs, _, _ = scan_runs(pagemap, memory.start, memory.region.end, vec=new_vec(16), vec_len=16, flags=0,
                            category_mask=PAGE_IS_PRESENT, return_mask=PAGE_IS_PRESENT | PAGE_IS_WRITTEN)
        assert runs == [(memory.start, 64)]
    finally:
        os.close(uffd)


def test_scan_errors_name_the_call_the_range_and_errno(pagemap, own_memory):
    memory = own_memory(4)
    start = memory.start + 1  # not page aligned
    with pytest.raises(OSError) as caught:
        _sys.pagemap_scan(pagemap, start, memory.region.end, ffi.NULL, 0, flags=0, return_mask=PAGE_IS_PRESENT)
    assert caught.value.errno == errno.EINVAL
    assert "PAGEMAP_SCAN" in str(caught.value) and f"{start:#x}" in str(caught.value)


def test_uffd_errors_name_the_call_the_range_and_errno(own_memory):
    need(features.sync_wp_missing())
    memory = own_memory(4)
    uffd = register_for_tracking([memory.region], "sync")
    try:
        outside = memory.start + 4 * PAGE  # beyond the registered range
        with pytest.raises(OSError) as caught:
            _sys.uffdio_writeprotect(uffd, outside, PAGE, protect=True)
        assert caught.value.errno == errno.ENOENT
        assert "UFFDIO_WRITEPROTECT" in str(caught.value) and f"{outside:#x}" in str(caught.value)
    finally:
        os.close(uffd)


@given(st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 1 << 20)), min_size=1, max_size=300))
def test_regions_convert_to_runs_exactly(spans):
    """The big-integer lane arithmetic in append_regions equals per-region arithmetic."""
    vec = new_vec(len(spans))
    address = 0x7F00_0000_0000
    for i, (gap, pages) in enumerate(spans):
        address += gap * PAGE
        vec[i].start, vec[i].end, vec[i].categories = address, address + pages * PAGE, PAGE_IS_WRITTEN
        address += pages * PAGE
    runs: list = []
    total, last_end = append_regions(runs, vec, len(spans), 12, may_touch=False)
    expected = [(vec[i].start, (vec[i].end - vec[i].start) // PAGE) for i in range(len(spans))]
    assert runs == expected
    assert total == sum(n for _, n in expected) and last_end == vec[len(spans) - 1].end


def test_a_large_region_is_walked_in_two_halves_with_the_same_runs(pagemap, own_memory, monkeypatch):
    """Over ``PARALLEL_SCAN_BYTES`` the walk is cut in two, the second half on a helper thread:
    the same runs (one across the cut is joined), the same pages, every page re-protected."""
    need(features.wp_async_missing())
    memory = own_memory(3008)
    uffd = register_for_tracking([memory.region], "async")
    try:
        memory.write(range(3008))
        one = Scanner(pagemap)
        one.scan([memory.region], **TRACK)                        # arm
        middle = list(range(1500, 1510))          # with the even pages around: 1500-1510, across the cut at 1504
        memory.write(SCATTERED + middle, value=5)
        monkeypatch.setattr(scan_module, "PARALLEL_SCAN_BYTES", PAGE)
        two = Scanner(pagemap)
        runs = two.scan([memory.region], **TRACK)
        assert_coalesced(runs)
        assert pages_of(runs, memory.start) == sorted(set(SCATTERED + middle))
        assert (memory.start + 1500 * PAGE, 11) in runs and two.last_pages == len(set(SCATTERED + middle))
        assert two.scan([memory.region], **TRACK) == []         # both halves re-protected
        memory.write([0, 3007], value=6)
        assert pages_of(two.scan([memory.region], **TRACK), memory.start) == [0, 3007]
    finally:
        os.close(uffd)


def test_halves_cut_regions_at_a_page_into_equal_bytes():
    a, b = Region(0x10000, 6 * PAGE), Region(0x100000, 2 * PAGE)
    assert halves([a, b], PAGE) == ([Region(0x10000, 4 * PAGE)], [Region(0x10000 + 4 * PAGE, 2 * PAGE), b])
    assert halves([a, Region(0x100000, 6 * PAGE)], PAGE) == ([a], [Region(0x100000, 6 * PAGE)])
    assert halves([Region(0, 3 * PAGE)], PAGE) == ([Region(0, PAGE)], [Region(PAGE, 2 * PAGE)])
