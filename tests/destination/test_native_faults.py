"""The destination's native fault loop (migrator.destination.native_faults) against a real
restore guest, with this test as the source on the other end of a socket pair: the records it
writes, the pages it installs, what it refuses. Every wait runs under a timeout: a guest
touching a missing page waits forever."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio

from migrator.core.digest import PageDigests
from migrator.core.errors import RemoteProtocolError, TransportError
from migrator.core.model import MemoryLayout, Region
from migrator.destination.faults import CURRENT
from migrator.destination.native_faults import NativeFaults
from migrator.guest.layout import region_digest
from migrator.native.pages import lib
from migrator.tracker.memory import ProcessMemory
from test_missing_pages import SIZE, WAIT, guest_page_pairs, missing_pages_of

P = 4096
SRC = 0x7E0000000000            # the source's region starts elsewhere: records use its addresses
RECORD = struct.Struct("=QQ")


async def _read_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


def _restored(dst, pages, layout, runs, absent=()):
    """Random bytes in the guest's region; ``runs`` marked missing and dropped, ``absent``
    dropped while current here (never-written pages: zero)."""
    base = layout.regions[0].start
    data = bytearray(os.urandom(SIZE))
    ProcessMemory(layout.pid).write_runs([(base, SIZE // P)], data)
    pages.mark_missing(runs)
    dst.discard(guest_page_pairs(layout, list(runs) + list(absent)))
    for address, count in absent:
        data[address - base : address - base + count * P] = bytes(count * P)
    return bytes(data)


def _loop(pages, window=4):
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    src = MemoryLayout(pid=0, page_size=P, regions=(Region(SRC, SIZE),))
    return NativeFaults(pages, ours.detach(), src, window), trio.socket.from_stdlib_socket(theirs), src


async def test_each_fault_window_is_asked_once_in_source_addresses_and_installed(guests):
    target = guests("target", restore=True)
    with target.client(timeout=WAIT) as dst, target.client(timeout=WAIT) as reader:
        pages, layout = missing_pages_of(dst)
        with pages:
            base = layout.regions[0].start
            runs = [(base + 40 * P, 3), (base + 200 * P, 40), (base + (SIZE // P - 2) * P, 2)]
            data = _restored(dst, pages, layout, runs, absent=[(base + 500 * P, 1)])
            native, peer, src = _loop(pages)
            asked: list[tuple[int, int]] = []

            async def source():
                while True:
                    header = await _read_exactly(peer, RECORD.size)
                    address, count = RECORD.unpack(header)
                    asked.append((address, count))
                    await _send_all(peer, header + data[address - SRC : address - SRC + count * P])

            try:
                with trio.fail_after(WAIT):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(native.run)
                        nursery.start_soon(source)
                        # the guest's digest touches every page: each missing one faults
                        assert await trio.to_thread.run_sync(reader.digest) == region_digest(data)
                        await _send_all(peer, RECORD.pack(lib.FAULT_END, 0))
                        await native.ended.wait()
                        assert native.failure is None
                        native.stop()
                        nursery.cancel_scope.cancel()
            finally:
                native.close()
                peer.close()
            wanted = {SRC + (a - base) + k * P for a, n in runs for k in range(n)}
            pages_asked = [a + k * P for a, n in asked for k in range(n)]
            assert sorted(pages_asked) == sorted(wanted), "each missing page asked for exactly once"
            assert all(1 <= n <= 4 for _, n in asked)               # the window
            assert pages.missing == 0 and pages.states.value_at(base + 41 * P) == CURRENT
            stats = native.statistics()
            assert stats.requested_pages == stats.installed_pages == len(wanted)
            assert 1 <= stats.faults <= len(asked) and stats.zero_filled == 1
            assert len(stats.latencies_s) == stats.faults and min(stats.latencies_s) > 0
            # the log holds each answered page's hash, as the push's recording would
            logged, expected = PageDigests(SIZE // P, P), PageDigests(SIZE // P, P)
            native.record_digests(logged)
            for address, count in asked:
                expected.record_runs(src, [(address, count)], data[address - SRC : address - SRC + count * P])
            assert logged.value() == expected.value()


@pytest.mark.parametrize("record, complaint", [
    (RECORD.pack(SRC + SIZE, 1), RemoteProtocolError),
    (RECORD.pack(SRC + SIZE - P, 2), RemoteProtocolError),
    (RECORD.pack(SRC + 1, 1), RemoteProtocolError),
    (RECORD.pack(SRC, lib.FAULT_MAX_PAGES + 1), RemoteProtocolError),
    (RECORD.pack(SRC, 0), RemoteProtocolError),
    (RECORD.pack(SRC, 2) + bytes(P), TransportError),
    (b"\x01" * 9, TransportError),
    (b"", TransportError),
], ids=["past-the-region", "across-its-end", "unaligned", "too-many-pages", "no-pages", "cut-in-its-pages",
        "cut-in-its-header", "closed-between-records"])
async def test_a_hostile_or_cut_answer_ends_the_loop_with_a_typed_failure(guests, record, complaint):
    target = guests("target", restore=True)
    with target.client(timeout=WAIT) as dst:
        pages, layout = missing_pages_of(dst)
        with pages:
            base = layout.regions[0].start
            _restored(dst, pages, layout, [(base, 4)])
            native, peer, _ = _loop(pages)
            try:
                with trio.fail_after(WAIT):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(native.run)
                        await _send_all(peer, record)
                        peer.close()
                        await native.ended.wait()
            finally:
                native.close()
            assert isinstance(native.failure, complaint), native.failure
            assert pages.missing == 4          # nothing installed from it


async def test_cancelling_the_task_stops_the_loop_thread(guests):
    target = guests("target", restore=True)
    with target.client(timeout=WAIT) as dst:
        pages, layout = missing_pages_of(dst)
        with pages:
            native, peer, _ = _loop(pages)
            try:
                with trio.fail_after(WAIT):
                    with trio.move_on_after(0.2):
                        await native.run()          # nothing comes: only the cancellation ends it
            finally:
                native.close()
                peer.close()
            assert native.failure is None and native.ended.is_set()
