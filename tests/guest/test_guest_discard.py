"""The restore guest's ``discard`` (post-copy): exactly the pages asked for leave its memory."""

from __future__ import annotations

import os
import struct
import time
from array import array

import pytest

from migrator.core.errors import GuestError
from migrator.guest import client as client_module
from migrator.tracker._uapi import PM_ENTRY_PRESENT
from migrator.tracker.memory import ProcessMemory

SIZE = 4 << 20
PAGES = SIZE // 4096


def wait_populated(client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.stats()["populated"]:
        assert time.monotonic() < deadline, "the restore guest never finished populating its region"
        time.sleep(0.02)


def present_pages(pid: int, start: int, pages: int) -> list[int]:
    """Page indices from ``start`` whose /proc/PID/pagemap entry has the present bit."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, 8 * pages, start // 4096 * 8)
    finally:
        os.close(fd)
    entries = struct.unpack(f"<{pages}Q", raw)
    return [i for i, entry in enumerate(entries) if entry & PM_ENTRY_PRESENT]


def pairs(*runs: tuple[int, int]) -> bytes:
    return array("Q", [v for run in runs for v in run]).tobytes()


def test_discard_drops_exactly_the_pages_asked_for(guests):
    guest = guests("restore", restore=True)
    with guest.client() as client:
        wait_populated(client)
        layout = client.attach("none").layout
        start = layout.regions[0].start
        memory = ProcessMemory(layout.pid)
        memory.write_runs([(start + 8 * 4096, 40)], os.urandom(40 * 4096))
        assert present_pages(layout.pid, start, PAGES) == list(range(PAGES))
        reply = client.discard(pairs((12, 3), (20, 1), (30, 5), (40, 0), (PAGES - 1, 1)))
        assert reply == {"pages": 10, "runs": 4}
        gone = {12, 13, 14, 20, 30, 31, 32, 33, 34, PAGES - 1}
        assert present_pages(layout.pid, start, PAGES) == [i for i in range(PAGES) if i not in gone]
        assert memory.read_runs([(start + 12 * 4096, 3)]) == bytes(3 * 4096)   # no uffd MISSING: zero pages
        assert client.stats()["state"] == "restoring"


def test_a_run_outside_the_region_drops_nothing(guests):
    guest = guests("restore", restore=True)
    with guest.client() as client:
        wait_populated(client)
        layout = client.attach("none").layout
        for bad in ((PAGES, 1), (PAGES - 2, 3), (1, (1 << 64) - 1)):
            with pytest.raises(GuestError, match=f"discard: pages outside the region's {PAGES} pages"):
                client.discard(pairs((0, 1), bad))
        assert present_pages(layout.pid, layout.regions[0].start, PAGES) == list(range(PAGES))
        with pytest.raises(GuestError, match="discard: pages must be base64"):
            client.request("discard", pages="not base64!")
        with pytest.raises(GuestError, match="discard: missing argument 'pages'"):
            client.request("discard")


def test_client_sends_max_check_runs_a_request_and_adds_up(guests, monkeypatch):
    guest = guests("restore", restore=True)
    monkeypatch.setattr(client_module, "MAX_CHECK_RUNS", 2)
    with guest.client() as client:
        wait_populated(client)
        layout = client.attach("none").layout
        reply = client.discard(pairs((1, 1), (3, 2), (6, 1), (9, 4), (20, 1)))
        assert reply == {"pages": 9, "runs": 5}
        assert present_pages(layout.pid, layout.regions[0].start, 24) == [0, 2, 5, 7, 8, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23]


def test_discard_is_refused_by_a_guest_that_runs_or_shares_its_memory(guests):
    running = guests("running", dirty_rate=1000)
    with running.client() as client:
        with pytest.raises(GuestError, match="discard: only a restore guest that has not resumed may drop pages"):
            client.discard(pairs((5, 1)))
    shared = guests("shared", restore=True, memfd=True)
    with shared.client() as client:
        with pytest.raises(GuestError, match="discard: a memfd guest's pages stay in its memfd"):
            client.discard(pairs((5, 1)))


def test_discard_of_more_runs_than_one_kernel_batch(guests):
    pages = 4096
    guest = guests("restore", restore=True, size=pages * 4096)
    with guest.client() as client:
        wait_populated(client)
        layout = client.attach("none").layout
        dropped = list(range(1, 2 * 1500, 2)) + [3500, 3501, 3502]       # 1500 runs of one page, then one of 3
        reply = client.discard(pairs(*[(i, 1) for i in dropped[:1500]], (3500, 3)))
        assert reply == {"pages": 1503, "runs": 1501}
        assert present_pages(layout.pid, layout.regions[0].start, pages) == sorted(set(range(pages)) - set(dropped))
