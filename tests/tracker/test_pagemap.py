"""The classic 8-byte pagemap reader (soft-dirty, and populated() without PAGEMAP_SCAN)."""

from __future__ import annotations

import os

import pytest
from tracker_helpers import need, pages_of

from migrator.tracker import features, open_tracker, pagemap, required_uffd_mode


def read(memory, select=pagemap.POPULATED):
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return pagemap.flagged_runs(fd, [memory.region], page_size=4096, select=select)
    finally:
        os.close(fd)


def test_populated_pages_across_chunks(own_memory, monkeypatch):
    monkeypatch.setattr(pagemap, "CHUNK_PAGES", 64)  # runs cross the chunk seams
    memory = own_memory(300)
    written = [0, 1, 63, 64, 65, 127, 128, 200, 299] + list(range(130, 190))
    memory.write(written)
    assert pages_of(read(memory), memory.start) == sorted(written)


def test_uffd_wp_bit_splits_swapped_entries(own_memory):
    memory = own_memory(8)
    memory.write([0, 1])
    assert read(memory, pagemap.SWAPPED_WRITTEN) == read(memory, pagemap.SWAPPED_PROTECTED) == []
    assert pages_of(read(memory, pagemap.PRESENT), memory.start) == [0, 1]


@pytest.mark.parametrize("kind", ["full", "sync-wp"])
def test_populated_falls_back_to_the_classic_pagemap(scratch, monkeypatch, kind):
    """Where PAGEMAP_SCAN is missing (before 6.7) the classic reader gives the same answer,
    also after sync-wp's protection put markers on never-touched pages (minus zero-page
    detection, hence no zero pages here)."""
    mode = required_uffd_mode(kind) or "none"
    need(features.sync_wp_missing() if mode == "sync" else None)
    child = scratch(4 << 20, mode)
    child.write_pages([0, 1, 2, 600, 1023])
    monkeypatch.setattr(features, "pagemap_scan_missing", lambda: "PAGEMAP_SCAN disabled by this test")
    with open_tracker(kind, pid=child.pid, regions=[child.region], uffd=child.take_uffd()) as tracker:
        assert pages_of(tracker.populated(), child.region.start) == [0, 1, 2, 600, 1023]
        tracker.arm()
        child.write_pages([7])
        assert pages_of(tracker.populated(), child.region.start) == [0, 1, 2, 7, 600, 1023]
