"""full (every populated page, every round) and soft-dirty (unavailable here, and says why)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from tracker_helpers import assert_coalesced, need, pages_of

from migrator.core.errors import TrackerUnavailable
from migrator.tracker import features, open_tracker
from migrator.tracker.soft_dirty import thread_states, frozen


def test_full_collect_is_populated_every_time(scratch):
    need(features.pagemap_scan_missing())
    child = scratch(4 << 20, "none")
    child.write_pages([0, 1, 2, 9, 1000])
    child.read_pages(range(500, 600))  # zero page: holds no data
    with open_tracker("full", pid=child.pid, regions=[child.region], uffd=None) as tracker:
        tracker.arm()
        assert pages_of(tracker.collect(), child.region.start) == [0, 1, 2, 9, 1000]
        child.write_pages([5])
        runs = tracker.collect()
        assert_coalesced(runs)
        assert runs == tracker.populated()
        assert pages_of(runs, child.region.start) == [0, 1, 2, 5, 9, 1000]


def test_soft_dirty_availability_is_reported_with_the_kernel_feature(scratch):
    reason = features.soft_dirty_missing()
    child = scratch(1 << 20, "none")
    if reason is None:
        with open_tracker("soft-dirty", pid=child.pid, regions=[child.region], uffd=None):
            pass
        return
    assert "CONFIG_MEM_SOFT_DIRTY" in reason
    with pytest.raises(TrackerUnavailable, match="soft-dirty tracker: kernel built without CONFIG_MEM_SOFT_DIRTY"):
        open_tracker("soft-dirty", pid=child.pid, regions=[child.region], uffd=None)


def test_soft_dirty_exact_sets(scratch):
    need(features.soft_dirty_missing())
    child = scratch(4 << 20, "none", populate=True)
    with open_tracker("soft-dirty", pid=child.pid, regions=[child.region], uffd=None) as tracker:
        tracker.arm()
        child.write_pages([3, 4, 5, 800])
        assert pages_of(tracker.collect(), child.region.start) == [3, 4, 5, 800]
        assert tracker.collect() == []
        assert child.alive()  # frozen during collect, then continued
        child.write_pages([9])
        assert pages_of(tracker.collect(), child.region.start) == [9]


def test_frozen_stops_every_thread_and_resumes_only_what_it_stopped(scratch):
    """soft-dirty's freeze around read+clear works on any kernel (SIGSTOP/SIGCONT)."""
    child = scratch(1 << 20, "none")
    child.start_writing(1000)  # a second thread in the child
    with frozen(child.pid):
        assert all(state in "tT" for state in thread_states(child.pid)) and len(thread_states(child.pid)) == 2
    assert child.written() >= 0  # answers again: it was continued
    os.kill(child.pid, signal.SIGSTOP)
    try:
        wait_until_stopped(child.pid)
        with frozen(child.pid):
            pass
        assert all(state in "tT" for state in thread_states(child.pid))  # still stopped: not ours to resume
    finally:
        os.kill(child.pid, signal.SIGCONT)
    child.stop_writing()


def wait_until_stopped(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(state in "tT" for state in thread_states(pid)):
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.001)
