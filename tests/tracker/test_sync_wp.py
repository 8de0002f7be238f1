"""sync-wp: the resolver-thread baseline reports what wp-async reports, and never leaves a writer blocked."""

from __future__ import annotations

import random

import pytest
from tracker_helpers import assert_coalesced, pages_of

from migrator.core.errors import TrackerUnavailable
from migrator.tracker import open_tracker
from migrator.tracker.sync_wp import pages_to_runs, parse_fault_pages

pytestmark = pytest.mark.usefixtures("need_sync_wp")

SIZE = 8 << 20  # 2048 pages
ROUNDS = [
    sorted(random.Random(1).sample(range(2048), 150)),  # scattered
    list(range(100, 400)),                               # contiguous
    [0, 1, 2] + list(range(1500, 1510)) + [2047],           # edges and a short run
]


def tracked(scratch, mode: str, kind: str, **kwargs):
    child = scratch(SIZE, mode, **kwargs)
    return child, open_tracker(kind, pid=child.pid, regions=[child.region], uffd=child.take_uffd())


def test_child_process_exact_sets(scratch):
    child, tracker = tracked(scratch, "sync", "sync-wp", populate=True)
    with tracker:
        tracker.arm()
        assert tracker.collect() == []
        for written in ROUNDS:
            child.write_pages(written)
            runs = tracker.collect()
            assert_coalesced(runs)
            assert pages_of(runs, child.region.start) == written
        assert tracker.collect() == []
        stats = tracker.statistics()
        assert stats.faults >= sum(map(len, ROUNDS)) and stats.pages_reported == sum(map(len, ROUNDS))


def test_sync_wp_and_wp_async_report_identical_sets(scratch, need_wp_async):
    """Same writes (on populated and never-touched pages) into two children, same answers."""
    children = [tracked(scratch, "sync", "sync-wp"), tracked(scratch, "async", "wp-async")]
    for child, tracker in children:
        child.write_pages(range(0, 2048, 2))  # half populated, half never touched
        tracker.arm()
    for written in ROUNDS:
        answers = []
        for child, tracker in children:
            child.write_pages(written)
            answers.append(pages_of(tracker.collect(), child.region.start))
        assert answers[0] == answers[1] == written
    for child, tracker in children:
        assert pages_of(tracker.populated(), child.region.start) == sorted(
            set(range(0, 2048, 2)).union(*ROUNDS)), tracker.name
        tracker.close()


def test_close_unprotects_so_the_guest_never_stays_blocked(scratch):
    # keep_uffd: the child holds the registration itself, so only an explicit unprotect helps it.
    child, tracker = tracked(scratch, "sync", "sync-wp", populate=True, keep_uffd=True, timeout=10.0)
    tracker.arm()
    tracker.close()
    child.write([[0, 2048]])  # would block forever on a protected page with no resolver


def test_an_async_registered_uffd_is_refused_with_the_reason(scratch, need_wp_async):
    child = scratch(1 << 20, "async")
    with pytest.raises(TrackerUnavailable, match="registered with WP_ASYNC; sync-wp needs"):
        open_tracker("sync-wp", pid=child.pid, regions=[child.region], uffd=child.take_uffd())


def test_an_unregistered_range_is_refused_with_the_reason(scratch):
    child = scratch(1 << 20, "sync")
    uffd = child.take_uffd()
    other = scratch(1 << 20, "none")  # same uffd, but a process whose range it never registered
    with pytest.raises(TrackerUnavailable, match="not registered for write-protect"):
        open_tracker("sync-wp", pid=other.pid, regions=[other.region], uffd=uffd)


def test_fault_messages_parse_to_pages():
    def msg(event, flags, address):
        return bytes([event]) + bytes(7) + flags.to_bytes(8, "little") + address.to_bytes(8, "little") + bytes(8)

    data = msg(0x12, 0b11, 0x7F0000001234) + msg(0x13, 0, 0x5000) + msg(0x12, 0b01, 0x9000) + msg(0x12, 0b10, 0x3000)
    assert parse_fault_pages(data, 4096) == [0x7F0000001000, 0x3000]
    assert pages_to_runs([0x3000, 0x1000, 0x2000, 0x9000], 4096) == [(0x1000, 3), (0x9000, 1)]
