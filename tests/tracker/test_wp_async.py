"""wp-async: exact written-page sets in this process and in a child; writes never block."""

from __future__ import annotations

import os
import random

import pytest
from tracker_helpers import assert_coalesced, pages_of

from migrator.core.errors import TrackerError, TrackerUnavailable
from migrator.tracker import _sys, open_tracker
from migrator.tracker.handover import register_for_tracking
from migrator.tracker.scratch import ScratchTimeout

pytestmark = pytest.mark.usefixtures("need_wp_async")

SCATTERED = sorted(random.Random(2).sample(range(4096), 300))
CONTIGUOUS = list(range(1000, 1700))


def own_tracker(memory):
    uffd = register_for_tracking([memory.region], "async")
    return open_tracker("wp-async", pid=os.getpid(), regions=[memory.region], uffd=uffd)


@pytest.mark.timeout(30)  # a write here could only block if WP_ASYNC were not in effect
@pytest.mark.parametrize("written", [SCATTERED, CONTIGUOUS, SCATTERED + CONTIGUOUS], ids=["scattered", "contiguous", "both"])
def test_in_process_exact_sets(own_memory, written):
    memory = own_memory(4096)
    memory.write(range(0, 4096, 3))  # some pages populated before arming
    with own_tracker(memory) as tracker:  # open_tracker checked WP_ASYNC is in effect: writes are safe
        tracker.arm()
        assert tracker.collect() == []
        memory.write(written)
        runs = tracker.collect()
        assert_coalesced(runs)
        assert pages_of(runs, memory.start) == sorted(set(written))
        assert tracker.collect() == []  # the second collect is empty
        memory.write(written[:5], value=8)  # protected again: the next writes are seen again
        assert pages_of(tracker.collect(), memory.start) == sorted(written[:5])
        stats = tracker.statistics()
        assert stats.collects == 4 and stats.pages_reported == len(set(written)) + 5 and stats.faults == 0


def test_child_process_exact_sets_over_rounds(scratch):
    child = scratch(16 << 20, "async", populate=True)
    with open_tracker("wp-async", pid=child.pid, regions=[child.region], uffd=child.take_uffd()) as tracker:
        tracker.arm()
        assert tracker.collect() == []
        rng = random.Random(5)
        for _ in range(3):
            written = sorted(set(rng.sample(range(4096), 200)) | set(range(rng.randrange(3000), 3000 + 50)))
            child.write_pages(written)
            runs = tracker.collect()
            assert_coalesced(runs)
            assert pages_of(runs, child.region.start) == written
        assert tracker.collect() == []


def test_never_touched_pages_written_after_arm_are_reported(scratch):
    child = scratch(4 << 20, "async")  # nothing populated
    with open_tracker("wp-async", pid=child.pid, regions=[child.region], uffd=child.take_uffd()) as tracker:
        tracker.arm()
        child.write_pages([3, 4, 5, 700])
        assert pages_of(tracker.collect(), child.region.start) == [3, 4, 5, 700]


def test_a_write_under_wp_async_never_blocks(scratch):
    child = scratch(16 << 20, "async", populate=True, timeout=10.0)
    with open_tracker("wp-async", pid=child.pid, regions=[child.region], uffd=child.take_uffd()) as tracker:
        tracker.arm()
        child.write([[0, 4096]])  # every page, each a first write after protection
        child.write_pages(SCATTERED)
        assert pages_of(tracker.collect(), child.region.start) == list(range(4096))


def test_the_blocking_check_catches_a_blocked_writer(scratch, need_sync_wp):
    """Control for the test above: a synchronously protected page does block, and is caught."""
    child = scratch(1 << 20, "sync", populate=True, timeout=1.0)
    uffd = child.take_uffd()
    try:
        _sys.uffdio_writeprotect(uffd, child.region.start, child.region.length, protect=True)
        with pytest.raises(ScratchTimeout):
            child.write_pages([1])
        _sys.uffdio_writeprotect(uffd, child.region.start, child.region.length, protect=False)  # wakes it
    finally:
        os.close(uffd)


def test_populated_excludes_never_touched_and_zero_pages(scratch):
    child = scratch(4 << 20, "async")
    child.write_pages([0, 1, 2, 10, 500])
    child.read_pages(range(600, 700))  # mapped to the shared zero page, never written
    with open_tracker("wp-async", pid=child.pid, regions=[child.region], uffd=child.take_uffd()) as tracker:
        assert pages_of(tracker.populated(), child.region.start) == [0, 1, 2, 10, 500]
        tracker.arm()
        child.write_pages([20])
        assert pages_of(tracker.populated(), child.region.start) == [0, 1, 2, 10, 20, 500]
        assert pages_of(tracker.collect(), child.region.start) == [20]  # populated() left protection alone


def test_a_sync_registered_uffd_is_refused_with_the_reason(scratch, need_sync_wp):
    child = scratch(1 << 20, "sync")
    with pytest.raises(TrackerUnavailable, match="not registered with userfaultfd WP_ASYNC.*EPERM"):
        open_tracker("wp-async", pid=child.pid, regions=[child.region], uffd=child.take_uffd())


def test_collect_after_the_process_died_names_the_failed_call(scratch):
    child = scratch(1 << 20, "async", populate=True)
    tracker = open_tracker("wp-async", pid=child.pid, regions=[child.region], uffd=child.take_uffd())
    with tracker:
        tracker.arm()
        child.close()
        with pytest.raises(TrackerError) as caught:
            tracker.collect()
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno
    assert "PAGEMAP_SCAN" in str(caught.value) and f"{child.region.start:#x}" in str(caught.value)
    with pytest.raises(TrackerError, match="closed"):
        tracker.collect()
    tracker.close()  # idempotent


@pytest.mark.timeout(30)
def test_collect_within_walks_only_the_ranges_asked_and_leaves_the_rest_for_later(own_memory):
    """Post-copy's final scan asks only where pages are not stale yet: writes elsewhere stay
    unreported and unprotected, so a later full collect still sees them; none asked, no walk."""
    from migrator.core.model import Region

    memory = own_memory(4096)
    ps = 4096
    with own_tracker(memory) as tracker:
        tracker.arm()
        memory.write([10, 11, 2000, 3000])
        inside = (Region(memory.start + 1000 * ps, 1500 * ps),)        # pages 1000-2499
        assert pages_of(tracker.collect(inside), memory.start) == [2000]
        assert tracker.collect(()) == [] and tracker.statistics().collects == 1   # nothing asked: no walk
        assert pages_of(tracker.collect(), memory.start) == [10, 11, 3000]   # not re-protected: seen now
        with pytest.raises(ValueError, match="not inside a tracked region"):
            tracker.collect((Region(memory.start + 4000 * ps, 200 * ps),))
