"""Post-copy's destination side of the uffd (migrator.destination.faults) against a real restore
guest: pages dropped by the guest, faults raised by its own touches, pages installed, tracking
back. Every wait on a fault has a timeout: a guest touching a missing page waits forever."""

from __future__ import annotations

import errno
import os
import select
import struct
import subprocess
import sys
import threading
import time

import pytest

from migrator.core.errors import MigratorError, TrackerError, TrackerUnavailable
from migrator.core.model import MemoryLayout
from migrator.destination.faults import CURRENT, MISSING, REQUESTED, MissingPages, guest_page_pairs, parse_faults
from migrator.guest.layout import region_digest
from migrator.tracker import features, open_tracker
from migrator.tracker.memory import ProcessMemory

P = 4096
SIZE = 4 << 20
WAIT = 10.0          # seconds any one wait on the guest or a fault may take


# --- parse_faults, on bytes ---------------------------------------------------------------------

def message(event: int, address: int, flags: int = 0) -> bytes:
    return struct.pack("=B7xQQII", event, flags, address, 77, 0)


def test_parse_faults_keeps_page_faults_page_aligned_and_skips_other_events():
    data = message(0x12, 0x7F0000001234) + message(0x13, 0x1000) + message(0x12, 0x7F0000005000, flags=1)
    assert parse_faults(data) == [0x7F0000001000, 0x7F0000005000]
    assert parse_faults(b"") == []
    assert parse_faults(message(0x12, 0x12345), page_size=1 << 16) == [0x10000]


@pytest.mark.parametrize("length", [1, 31, 33, 63])
def test_parse_faults_refuses_what_is_not_whole_messages(length):
    data = (message(0x12, 0x1000) * 2)[:length]
    with pytest.raises(TrackerError, match=f"not {length} bytes"):
        parse_faults(data)


def test_parse_faults_refuses_a_page_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError):
        parse_faults(message(0x12, 0x1000), page_size=3000)


def test_missing_pages_imports_no_trio():
    # the engines call it from trio code, but it is synchronous and must stay importable alone
    probe = "import sys, migrator.destination.faults; print('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip() == "False"


# --- a real restore guest -------------------------------------------------------------------------

def wait_populated(client) -> None:
    deadline = time.monotonic() + WAIT
    while not client.stats()["populated"]:
        assert time.monotonic() < deadline, "the restore guest never finished populating its region"
        time.sleep(0.02)


def missing_pages_of(client) -> tuple[MissingPages, MemoryLayout]:
    """Attach to a populated restore guest and register its uffd MISSING (skip without it)."""
    reason = features.wp_async_missing()
    if reason:
        pytest.skip(reason)
    wait_populated(client)
    attachment = client.attach("wp-async")
    assert attachment.uffd is not None and attachment.restore
    pages = MissingPages(attachment.uffd, attachment.layout)
    try:
        pages.register()
        pages.register()                   # idempotent
    except TrackerUnavailable as exc:
        pages.close()
        pytest.skip(f"no userfaultfd MISSING mode: {exc}")
    return pages, attachment.layout


def serve(pages: MissingPages, data: bytes, base: int, until: threading.Thread, window: int) -> list[list]:
    """Answer the guest's faults from ``data`` (its region's intended bytes) until ``until``
    ends; returns the claimed runs of each round. Fails after WAIT seconds without progress."""
    rounds = []
    deadline = time.monotonic() + WAIT
    while until.is_alive():
        assert time.monotonic() < deadline, "the guest's touch was never reported or never ended"
        readable, _, _ = select.select([pages.fileno()], [], [], 0.1)
        if not readable:
            continue
        claimed = pages.claim(pages.read_faults(), window)
        if claimed:
            payload = b"".join(data[a - base : a - base + n * P] for a, n in claimed)
            pages.install(claimed, payload)
            rounds.append(claimed)
    return rounds


def in_thread(call) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(_outcome(call)), daemon=True)
    thread.start()
    return thread, result


def _outcome(call):
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the test asserts on it
        return exc


def test_post_copy_end_to_end_faults_served_rest_pushed_then_trackable_again(guests):
    source = guests("source", fill="text", seed=4, dirty_rate=100_000)
    target = guests("target", restore=True)
    with source.client() as src, target.client(timeout=WAIT) as dst, target.client(timeout=WAIT) as reader:
        steps = src.pause()
        theirs = src.attach("none").layout
        data = bytes(ProcessMemory(theirs.pid).read(theirs.regions[0].start, SIZE))
        pages, layout = missing_pages_of(dst)
        with pages:
            base = layout.regions[0].start
            memory = ProcessMemory(layout.pid)
            memory.write_runs([(base, SIZE // P)], data)
            # data pages to drop: scattered single pages, runs, and the region's last page
            runs = [(base + 40 * P, 3), (base + 100 * P, 1), (base + 101 * P, 1), (base + 400 * P, 17),
                    (base + (SIZE // P - 1) * P, 1)]
            dropped = sum(n for _, n in runs)
            assert pages.mark_missing(runs) == dropped and pages.missing == dropped
            assert dst.discard(guest_page_pairs(layout, runs)) == {"pages": dropped, "runs": len(runs)}
            assert pages.states.value_at(base + 41 * P) == MISSING and pages.read_faults() == []

            # a kernel access to a missing page does not wait (the guest's uffd is user-mode only)
            thread, outcome = in_thread(lambda: memory.read_runs([(base + 40 * P, 1)]))
            thread.join(WAIT)
            assert not thread.is_alive() and isinstance(outcome[0], OSError) and outcome[0].errno == errno.EFAULT

            # the guest's own touch (its page check) waits until the page is installed
            first = guest_page_pairs(layout, [runs[0]])
            thread, outcome = in_thread(lambda: reader.check(deep=True, pages=first))
            rounds = serve(pages, data, base, until=thread, window=2)
            thread.join(WAIT)
            assert outcome and outcome[0]["clean"], outcome
            served = [run for claimed in rounds for run in claimed]
            assert served and served[0][0] == base + 40 * P
            assert all(base + 40 * P <= a and a + n * P <= base + 43 * P for a, n in served)  # the window stops at the run
            assert pages.states.value_at(base + 40 * P) == CURRENT

            with pytest.raises(MigratorError, match=f"{dropped - 3} pages are still missing"):
                pages.finish()

            # the background push: every page of the runs, those already current skipped
            payload = b"".join(data[a - base : a - base + n * P] for a, n in runs)
            assert pages.install(runs, payload) == (dropped - 3, 0)
            assert pages.missing == 0
            assert pages.install([(base + 100 * P, 1)], data[100 * P : 101 * P]) == (0, 0)   # current: no-op
            assert dst.digest() == src.digest()

            pages.finish()
            tracker = open_tracker("wp-async", pid=layout.pid, regions=layout.regions, uffd=os.dup(pages.fileno()))
            with tracker:                      # check_mode: PM_SCAN_CHECK_WPASYNC succeeded
                tracker.arm()
                dst.resume(until_step=steps + 500)
                src.resume(until_step=steps + 500)
                assert dst.pause(at_step=steps + 500) == src.pause(at_step=steps + 500)
                written = tracker.collect()
                # its page writes, seen again, and the control block and version table they update
                assert 0 < sum(n for _, n in written) <= 500 + 3
            assert dst.digest() == src.digest()


def test_zero_pages_and_pages_found_present(guests):
    target = guests("target", restore=True)
    with target.client(timeout=WAIT) as dst:
        pages, layout = missing_pages_of(dst)
        with pages:
            base = layout.regions[0].start
            memory = ProcessMemory(layout.pid)
            filled = bytes([7]) * (8 * P)
            memory.write_runs([(base + 10 * P, 8)], filled)
            # pages 10-17 missing, but only 10, 12 and 13 dropped: 11 and 14-17 are present
            pages.mark_missing([(base + 10 * P, 8)])
            dst.discard(guest_page_pairs(layout, [(base + 10 * P, 1), (base + 12 * P, 2)]))
            assert pages.claim([base + 12 * P + 5], 1) == [(base + 12 * P, 1)]
            # one stretch of eight non-current pages: the copy stops at each present one (EEXIST)
            assert pages.install([(base + 10 * P, 8)], bytes([9]) * (8 * P)) == (3, 1)
            assert pages.missing == 0
            assert bytes(memory.read_runs([(base + 10 * P, 8)])) == b"".join(
                bytes([9 if i in (0, 2, 3) else 7]) * P for i in range(8))
            # zero pages
            pages.mark_missing([(base + 20 * P, 2)])
            dst.discard(guest_page_pairs(layout, [(base + 20 * P, 2)]))
            assert pages.install([(base + 20 * P, 2)], None) == (2, 0)
            assert bytes(memory.read_runs([(base + 20 * P, 2)])) == bytes(2 * P)
            pages.finish()


def test_hostile_runs_and_addresses_are_refused_by_name(guests):
    target = guests("target", restore=True)
    with target.client(timeout=WAIT) as dst:
        pages, layout = missing_pages_of(dst)
        with pages:
            base, end = layout.regions[0].start, layout.regions[0].end
            with pytest.raises(OSError, match=f"{end:#x}") as info:
                pages.mark_missing([(end, 1)])
            assert info.value.errno == errno.EFAULT
            with pytest.raises(OSError, match="lie outside the layout"):
                pages.install([(base, 1), (base, (1 << 64) // P)], None)
            with pytest.raises(ValueError, match="bytes for 2 pages"):
                pages.install([(base, 2)], bytes(P))
            with pytest.raises(OSError, match="outside the layout"):
                pages.claim([base - P], 4)
            pages.mark_missing([(end - 2 * P, 2)])
            assert pages.claim([end - 2 * P, end - P], 16) == [(end - 2 * P, 2)]   # the window stops at the region's end
            assert pages.states.value_at(end - P) == REQUESTED
            assert pages.missing == 2


def test_a_fault_on_an_absent_page_current_here_gets_a_zero_page(guests):
    target = guests("target", restore=True)
    with target.client(timeout=WAIT) as dst, target.client(timeout=WAIT) as reader:
        pages, layout = missing_pages_of(dst)
        with pages:
            base = layout.regions[0].start
            data = bytearray(SIZE)
            data[5 * P : 9 * P] = os.urandom(4 * P)
            ProcessMemory(layout.pid).write_runs([(base + 5 * P, 4)], data[5 * P : 9 * P])
            dst.discard(guest_page_pairs(layout, [(base + 6 * P, 1)]))     # absent, yet CURRENT here
            data[6 * P : 7 * P] = bytes(P)
            thread, outcome = in_thread(reader.digest)          # touches every page of the region
            assert serve(pages, bytes(data), base, until=thread, window=4) == []   # nothing to ask for
            thread.join(WAIT)
            assert outcome == [region_digest(bytes(data))]
            assert pages.zero_filled == 1 and pages.missing == 0


def test_a_touch_waits_through_a_lost_holder_until_a_new_one_installs_the_page(guests):
    target = guests("target", restore=True)
    with target.client(timeout=WAIT) as dst, target.client(timeout=30) as reader:
        pages, layout = missing_pages_of(dst)
        base = layout.regions[0].start
        data = os.urandom(SIZE)
        ProcessMemory(layout.pid).write_runs([(base, SIZE // P)], data)
        lost = [(base + 300 * P, 1)]
        pages.mark_missing(lost)
        dst.discard(guest_page_pairs(layout, lost))
        thread, outcome = in_thread(reader.digest)
        assert select.select([pages.fileno()], [], [], WAIT)[0], "the guest's touch was never reported"
        assert pages.read_faults() == [base + 300 * P]       # read, and never answered by this holder
        pages.close()
        thread.join(0.5)
        assert thread.is_alive()                               # still waiting: the guest holds the uffd too
        again = MissingPages(dst.attach("wp-async").uffd, layout)   # a new holder (a recovered receiver)
        with again:
            again.register()
            assert again.mark_missing(lost) == 1
            assert again.install(lost, data[300 * P : 301 * P]) == (1, 0)
            thread.join(WAIT)
            assert outcome == [region_digest(data)]
            again.finish()


def test_claims_racing_a_push_leave_every_page_installed_once_and_counted(guests):
    target = guests("target", restore=True)
    with target.client(timeout=WAIT) as dst:
        pages, layout = missing_pages_of(dst)
        with pages:
            base, total = layout.regions[0].start, SIZE // P
            data = os.urandom(SIZE)
            everything = [(base, total)]
            pages.mark_missing(everything)
            dst.discard(guest_page_pairs(layout, everything))
            claimed: list = []

            def claims() -> None:          # the fault path, asking for pages all over the region
                for i in range(total):
                    claimed.extend(pages.claim([base + (i * 613 % total) * P], 3))

            counts: list = []

            def push() -> None:            # the background push, 16 pages a call
                for first in range(0, total, 16):
                    counts.append(pages.install([(base + first * P, 16)], data[first * P : (first + 16) * P]))

            start = threading.Barrier(2)
            threads = [threading.Thread(target=lambda: (start.wait(WAIT), claims())),
                       threading.Thread(target=lambda: (start.wait(WAIT), push()))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)
            assert not any(thread.is_alive() for thread in threads)
            assert pages.missing == 0 and pages.zero_filled == 0
            assert sum(n for n, _ in counts) == total                       # each page installed once
            assert sum(r for _, r in counts) == sum(n for _, n in claimed)  # every claimed page, counted once
            assert dst.digest() == region_digest(data)
