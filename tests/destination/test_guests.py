"""Restore guests prepared ahead (``receive --prepare``) and started on demand: real processes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import trio

from migrator.core.tokens import load_default_token
from migrator.destination.guests import RestoreGuests
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.tracker.memory import MemfdMemory, ProcessMemory
from migrator.source.migration import MigrateSettings, SourceMigration

MiB = 1 << 20


@pytest.mark.parametrize("memfd", [False, True])
async def test_prepared_guest_is_populated_taken_and_replaced(sockdir, memfd):
    lines: list[str] = []
    guests = RestoreGuests(sockdir, prepare=32 * MiB, memfd=memfd, log=lines.append)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guests.keep_prepared)
            while not lines:
                await trio.sleep(0.05)
            assert "prepared a 32 MiB restore guest" in lines[0]
            first = await guests.take(32 * MiB)
            assert first.prepared and first.guest.alive()
            stats = first.client.stats()
            assert stats["state"] == "restoring" and stats["populated"] is True
            assert isinstance(first.memory, MemfdMemory if memfd else ProcessMemory)
            region = first.layout.regions[0]
            first.memory.write_runs([(region.start, 1)], b"x" * 4096)     # writable, in the guest
            assert bytes(ProcessMemory(first.guest.pid).read_runs([(region.start, 1)])) == b"x" * 4096
            other = await guests.take(16 * MiB)               # another size: started on demand
            assert not other.prepared and other.guest.alive() and other.layout.regions[0].length == 16 * MiB
            while len(lines) < 2:                             # the next one is prepared
                await trio.sleep(0.05)
            spare = guests._prepared
            assert spare is not None and spare.guest.pid != first.guest.pid
            nursery.cancel_scope.cancel()
    assert not spare.guest.alive(), "an unclaimed prepared guest is killed when the receiver stops"
    for target in (first, other):
        target.close()
        assert not target.guest.alive()


async def test_take_waits_for_a_guest_that_is_still_starting(sockdir):
    guests = RestoreGuests(sockdir, prepare=16 * MiB)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(guests.keep_prepared, again=False))  # starting, not ready
            target = await guests.take(16 * MiB)
    assert target.prepared, "the guest being prepared is handed over instead of starting a second one"
    target.close()


def test_receive_prepare_migrates_into_the_prepared_guest(sockdir):
    report = os.path.join(sockdir, "dest.json")
    receiver = subprocess.Popen(
        [sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0", "--once", "--prepare", "64M",
         "--control-dir", sockdir, "--report", report],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert "token " in receiver.stderr.readline()
        address = receiver.stderr.readline().strip().rsplit(" ", 1)[-1]
        assert "prepared a 64 MiB restore guest" in receiver.stderr.readline()
        settings = MigrateSettings(token=load_default_token())   # the one the receiver made
        with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=2000, fill="text") as guest:
            result = trio.run(SourceMigration(guest.control, address, settings).run).to_dict()
        assert result["verified"] and result["result"] == "committed"
        assert receiver.wait(timeout=30) == 0
    finally:
        receiver.kill()
        receiver.wait()
    with open(report) as f:
        dest = json.load(f)
    assert dest["restore_guest"] == "prepared" and dest["result"] == "resumed"
    assert dest["parts_ms"]["spawn_guest"] < 100, "taking a prepared guest starts no process"
    with GuestClient(dest["guest_control"]) as client:
        assert client.check()["clean"]
        client.quit()


@pytest.mark.parametrize("size", ["12", "1Q"])
def test_receive_rejects_a_bad_prepare_size(size):
    result = subprocess.run([sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0", "--prepare", size],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--prepare" in result.stderr and "size" in result.stderr


async def test_a_closed_target_leaves_no_socket_and_close_ends_every_unsettled_target(sockdir):
    guests = RestoreGuests(sockdir)
    with trio.fail_after(60):
        closed = await guests.take(16 * MiB)
        released = await guests.take(16 * MiB)
        forgotten = await guests.take(16 * MiB)        # a migration whose cleanup was cut short
    closed.close()                                     # SIGKILL: the guest cannot remove its socket itself
    assert not closed.guest.alive() and not os.path.lexists(closed.guest.control)
    released.release()                                 # resumed: runs on its own
    guests.close()
    assert not forgotten.guest.alive() and not os.path.lexists(forgotten.guest.control)
    assert released.guest.alive(), "a resumed guest is not the receiver's to kill"
    with GuestClient(released.guest.control) as client:
        client.quit()
    with trio.fail_after(15):
        while os.path.exists(f"/proc/{released.guest.pid}"):
            await trio.sleep(0.05)                      # reaped by its thread, not left a zombie
    assert sorted(os.listdir(sockdir)) == []
