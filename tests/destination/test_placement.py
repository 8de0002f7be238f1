"""Restore guests on a memfd receive raw batches in place (natively on an authenticated socket,
scattered ones too); private ones, and post-copy's, do not."""

import errno
import functools
import mmap
import os
import socket

import pytest
import trio

from migrator.core.digest import hash_pages_into, new_hashes
from migrator.core.errors import MigrationFailed
from migrator.core.model import Region
from migrator.core.runs import Runs
from migrator.destination.engine import DestinationMigration, ReceiveSettings
from migrator.destination.placement import RunsPlacement
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.tracker.memory import MemfdMemory
from migrator.transport import serve

MiB = 1 << 20
PAGES = 64 * MiB // 4096


async def migrate(sockdir: str, receive: ReceiveSettings, settings: MigrateSettings, fill: str = "random"):
    outcomes: list[dict] = []

    async def handle(channel):
        migration = DestinationMigration(channel, receive, log=lambda line: None)
        try:
            outcomes.append((await migration.run()).to_dict())
        except MigrationFailed:
            outcomes.append(migration.report.to_dict())

    with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=2000, fill=fill) as guest:
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                address = await nursery.start(functools.partial(serve, "127.0.0.1:0", handle, token=None))
                report = (await SourceMigration(guest.control, address, settings).run()).to_dict()
                nursery.cancel_scope.cancel()
    return report, outcomes[0]


def check_resumed(dest: dict) -> None:
    with GuestClient(dest["guest_control"]) as client:
        assert client.check()["clean"]
        client.quit()


async def test_a_memfd_restore_guest_receives_round_zero_in_place(sockdir):
    report, dest = await migrate(sockdir, ReceiveSettings(control_dir=sockdir), MigrateSettings(compress="none"))
    assert report["verified"] and dest["result"] == "resumed"
    assert dest["pages_placed"] >= PAGES, "every page of round 0 (batches of one run) lands in place"
    assert dest["pages_placed"] <= dest["pages_applied"]
    check_resumed(dest)


async def test_compressed_batches_still_go_through_a_buffer(sockdir):
    report, dest = await migrate(sockdir, ReceiveSettings(control_dir=sockdir), MigrateSettings(), fill="text")
    assert report["verified"] and dest["result"] == "resumed"
    assert dest["pages_placed"] < dest["pages_applied"] // 10
    check_resumed(dest)


async def test_a_private_restore_guest_is_written_across_processes(sockdir):
    report, dest = await migrate(sockdir, ReceiveSettings(control_dir=sockdir, memfd=False), MigrateSettings(compress="none"))
    assert report["verified"] and dest["result"] == "resumed"
    assert dest["pages_placed"] == 0 and dest["pages_applied"] >= PAGES
    check_resumed(dest)


@pytest.mark.parametrize("postcopy", [{"postcopy_after": 0}, {"postcopy_auto": True}])
async def test_a_post_copy_session_gets_a_private_guest_from_a_memfd_receiver(sockdir, postcopy):
    """Also a hybrid that converged before it had to switch: the guest was chosen at the Layout."""
    report, dest = await migrate(sockdir, ReceiveSettings(control_dir=sockdir),
                                 MigrateSettings(compress="none", **postcopy))
    assert report["verified"] and dest["result"] == "resumed"
    assert (dest["postcopy"] is not None) == ("postcopy_after" in postcopy)
    assert dest["pages_placed"] == 0, "nothing is placed into a guest that may fault its pages in"
    check_resumed(dest)


# --- RunsPlacement: a payload received by C into its runs' places ------------------------------

P = 4096


def _memfd(pages: int):
    fd = os.memfd_create("placement")
    os.ftruncate(fd, pages * P)
    return fd


def _hashes_of(data: bytes):
    hashes = new_hashes(len(data) // P)
    hash_pages_into(data, len(hashes), P, hashes)
    return hashes


def _scattered_in_two_regions():
    """Two regions laid one after the other in a 48-page memfd, and 20 runs in both: singles,
    neighbours (joined into one place) and a run of 5."""
    first, second = Region(0x100000, 32 * P), Region(0x900000, 16 * P)
    runs = [(first.start + k * 2 * P, 1) for k in range(12)] + [(first.start + 25 * P, 1), (first.start + 26 * P, 1),
            (second.start, 5)] + [(second.start + (6 + k) * P, 1) for k in range(5)]
    return [first, second], Runs.pack(runs)


@pytest.fixture
def placed():
    """(memfd, its regions, scattered runs, a writable MemfdMemory over it), closed after."""
    regions, runs = _scattered_in_two_regions()
    fd = _memfd(48)
    memory = MemfdMemory(fd, regions, writable=True)
    yield fd, regions, runs, memory
    memory.close()
    os.close(fd)


def _places(regions, runs):
    """Each run's offset in the memfd."""
    offsets, at = {}, 0
    for r in regions:
        offsets[r.start] = (r, at)
        at += r.length
    out = []
    for address, count in runs:
        region, base = next(v for v in offsets.values() if v[0].start <= address < v[0].end)
        out.append((base + address - region.start, count * P))
    return out


def test_a_scattered_payload_lands_in_its_runs_places_over_many_partial_receives(placed):
    fd, regions, runs, memory = placed
    placement = RunsPlacement(memory, runs, P)
    payload = os.urandom(placement.nbytes)
    assert placement.nbytes == 24 * P and placement.payload == (placement,)
    a, b = socket.socketpair()
    b.setblocking(False)
    with a, b:
        placement.copy_in(0, memoryview(payload[: P + 100]))     # read with the frame's head
        offset = P + 100
        assert placement.receive(b.fileno(), offset) is None      # nothing there yet
        for cut in (offset + 7, 3 * P, 10 * P + 1, placement.nbytes):
            a.sendall(payload[offset:cut])
            while offset < cut:
                n = placement.receive(b.fileno(), offset)
                assert n, "a receive into its places moves bytes while there are some"
                offset += n
        a.close()
        assert placement.receive(b.fileno(), offset - 1) == 0      # the peer's end
    m = mmap.mmap(fd, 48 * P)
    assert b"".join(m[o : o + n] for o, n in _places(regions, runs)) == payload
    placement.hash()
    assert placement.hashes == _hashes_of(payload)
    m.close()


def test_a_run_outside_the_mapping_is_refused_before_a_byte_is_read(placed):
    fd, regions, runs, memory = placed
    for bad in (Runs.pack([*runs, (regions[1].end, 1)]), Runs.pack([(regions[0].start + 31 * P, 2)]),
                Runs.pack([(2**64 - P, 1)])):
        placement = RunsPlacement(memory, bad, P)
        a, b = socket.socketpair()
        with a, b:
            a.sendall(b"x" * placement.nbytes)
            with pytest.raises(OSError, match="outside the guest's regions") as info:
                placement.receive(b.fileno(), 0)
            assert info.value.errno == errno.EFAULT
            assert len(b.recv(1 << 20, socket.MSG_DONTWAIT)) == placement.nbytes, "nothing was read"
            with pytest.raises(OSError, match="outside the guest's regions"):
                placement.copy_in(0, memoryview(b"x" * P))
    reader = MemfdMemory(fd, regions)
    with pytest.raises(OSError, match="read-only"):
        RunsPlacement(reader, runs, P)
    reader.close()


def test_a_socket_error_comes_back_with_the_kernels_errno(placed):
    fd, regions, runs, memory = placed
    placement = RunsPlacement(memory, runs, P)
    with pytest.raises(OSError) as info:
        placement.receive(fd, 0)                                  # a memfd is not a socket
    assert info.value.errno == errno.ENOTSOCK


async def test_an_authenticated_session_places_its_scattered_rounds_too(sockdir):
    """No payload tags on an authenticated loopback session: every raw batch, a late round's
    run per page included, is received in place (pages_placed is every page applied)."""
    token = b"placement-test-token-0123456789"
    outcomes: list[dict] = []

    async def handle(channel):
        outcomes.append((await DestinationMigration(channel, ReceiveSettings(control_dir=sockdir), log=lambda line: None).run()).to_dict())

    with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=20000, fill="random") as guest:
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                address = await nursery.start(functools.partial(serve, "127.0.0.1:0", handle, token=token))
                report = (await SourceMigration(guest.control, address, MigrateSettings(compress="none", token=token)).run()).to_dict()
                nursery.cancel_scope.cancel()
    dest = outcomes[0]
    assert report["verified"] and dest["result"] == "resumed"
    assert max(r["dirty_pages"] for r in report["rounds"][1:]) > 64, "a later round sent scattered batches"
    assert dest["pages_placed"] == dest["pages_applied"] > PAGES
    check_resumed(dest)
