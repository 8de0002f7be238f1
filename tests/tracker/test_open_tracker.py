"""open_tracker's refusals: each names what is missing or wrong, and the uffd is never leaked."""

from __future__ import annotations

import contextlib
import json
import mmap
import os

import pytest
from tracker_helpers import PAGE, need, pages_of

from migrator.core.errors import GuestError, TrackerError, TrackerUnavailable
from migrator.core.model import Region
from migrator.tracker import TRACKERS, _sys, features, open_tracker, required_uffd_mode
from migrator.tracker.handover import create_uffd, register_for_tracking, take_fd
from migrator.tracker.scratch import MAP_HUGETLB

NOBODY = 65534


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_required_uffd_modes():
    assert [required_uffd_mode(kind) for kind in TRACKERS] == ["async", "sync", None, None]
    with pytest.raises(TrackerError, match="unknown tracker 'bogus'"):
        required_uffd_mode("bogus")


@pytest.mark.parametrize(
    ("kind", "regions", "message"),
    [
        ("bogus", None, "unknown tracker 'bogus'; choose one of wp-async"),
        ("full", "none", "no regions to track"),
        ("full", "unaligned", "is not a non-empty multiple of the 4096-byte page size"),
        ("full", "overlapping", "regions overlap"),
        ("full", "unmapped", "is not mapped in process"),
        ("wp-async", None, "wp-async needs the guest's userfaultfd"),
    ],
)
def test_bad_input_is_one_line_naming_it(own_memory, kind, regions, message):
    memory = own_memory(4)
    regions = {
        None: [memory.region],
        "none": [],
        "unaligned": [Region(memory.start + 1, PAGE)],
        "overlapping": [memory.region, Region(memory.start + PAGE, PAGE)],
        "unmapped": [Region(memory.start, 4 * PAGE), Region(memory.region.end + (1 << 40), PAGE)],
    }[regions]
    with pytest.raises(TrackerError, match=message) as caught:
        open_tracker(kind, pid=os.getpid(), regions=regions, uffd=None)
    assert "\n" not in str(caught.value)


def test_an_fd_that_is_not_a_uffd_is_refused_and_closed(own_memory):
    memory = own_memory(4)
    fd = os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(TrackerError, match="is not a userfaultfd"):
        open_tracker("wp-async", pid=os.getpid(), regions=[memory.region], uffd=fd)
    assert not fd_is_open(fd)  # ownership was taken, even on failure


def test_a_missing_process_is_unavailable_and_the_uffd_closed(own_memory, need_wp_async):
    memory = own_memory(4)
    uffd = register_for_tracking([memory.region], "async")
    with pytest.raises(TrackerUnavailable, match="process 999999999 does not exist"):
        open_tracker("wp-async", pid=999_999_999, regions=[memory.region], uffd=uffd)
    assert not fd_is_open(uffd)


def test_no_ptrace_rights_over_the_pid_is_unavailable_with_the_reason(own_memory):
    """An unprivileged user cannot open a root process's pagemap."""
    if os.geteuid() != 0:
        target = 1  # init: another user's process
        with pytest.raises(TrackerUnavailable, match="no ptrace read rights over process 1"):
            open_tracker("full", pid=target, regions=[Region(PAGE, PAGE)], uffd=None)
        return
    memory = own_memory(4)  # in this root process; a child drops to nobody and tries to track it
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.close(read_end)
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            open_tracker("full", pid=os.getppid(), regions=[memory.region], uffd=None)
            result = {"error": None}
        except BaseException as exc:  # report everything to the parent
            result = {"error": type(exc).__name__, "message": str(exc)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = json.loads(pipe.read() or b"{}")
    os.waitpid(child, 0)
    assert result.get("error") == "TrackerUnavailable", result
    assert f"no ptrace read rights over process {os.getpid()}" in result["message"]


@pytest.fixture
def hugetlb_pages():
    """Reserve two huge pages for the test (root), restoring vm.nr_hugepages afterwards."""
    path = "/proc/sys/vm/nr_hugepages"
    with open(path) as f:
        before = int(f.read())
    try:
        with open(path, "w") as f:
            f.write(str(before + 2))
        with open(path) as f:
            reserved = int(f.read()) - before
    except OSError as exc:
        pytest.skip(f"no hugetlb pages can be reserved (vm.nr_hugepages: {exc.strerror})")
    try:
        if reserved < 1:
            pytest.skip("no hugetlb pages can be reserved (vm.nr_hugepages did not grow)")
        yield
    finally:
        with contextlib.suppress(OSError), open(path, "w") as f:
            f.write(str(before))


def test_hugetlb_is_refused_on_both_sides_naming_the_mapping(hugetlb_pages, scratch):
    size = 2 << 20
    huge = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
    try:
        region = Region(_sys.buffer_address(huge), size)
        described = f"{region.start:#x}-{region.end:#x}"
        with pytest.raises(TrackerUnavailable, match=f"hugetlb mapping cannot be tracked.*{described}"):
            register_for_tracking([region], "async")  # the guest's side
        need(features.sync_wp_missing())
        uffd = create_uffd("sync")
        with pytest.raises(TrackerUnavailable, match=f"hugetlb mapping cannot be tracked.*{described}"):
            open_tracker("sync-wp", pid=os.getpid(), regions=[region], uffd=uffd)  # the migrator's side
        assert not fd_is_open(uffd)
    finally:
        huge.close()
    with pytest.raises(GuestError, match="hugetlb mapping cannot be tracked"):
        scratch(size, "async", hugetlb=True)  # a child refuses it too and says why


def test_the_uffd_can_be_taken_with_pidfd_getfd(scratch, need_wp_async):
    child = scratch(1 << 20, "async", populate=True, keep_uffd=True)
    os.close(child.take_uffd())  # forget the SCM_RIGHTS copy; take the child's own fd instead
    uffd = take_fd(child.pid, child.child_uffd_fd)
    with open_tracker("wp-async", pid=child.pid, regions=[child.region], uffd=uffd) as tracker:
        tracker.arm()
        child.write_pages([7, 8])
        assert pages_of(tracker.collect(), child.region.start) == [7, 8]
