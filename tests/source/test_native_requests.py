"""The source's native request loop (migrator.source.native_requests) with this test as the
destination on the other end of a socket pair: answers read from this process's own memory (as
from a guest's, with process_vm_readv) or from a memfd mapping, claims in the shared page-state
table, the end record, and the requests it refuses. Every wait runs under a timeout."""

from __future__ import annotations

import mmap
import os
import socket
import struct

import pytest
import trio

from migrator.core.digest import PageDigests
from migrator.core.errors import RemoteProtocolError, TransportError
from migrator.core.model import MemoryLayout, Region
from migrator.core.pagestate import PageStates
from migrator.native.pages import ffi, lib
from migrator.source.native_requests import NativeRequests
from migrator.tracker.memory import MemfdMemory, ProcessMemory

P = 4096
PAGES = 64                       # per region; two regions
WAIT = 10.0
RECORD = struct.Struct("=QQ")
STALE, SENT = 1, 0


async def _read_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"{len(data)} of {n} bytes")
        data += chunk
    return data


class _Guest:
    """Two regions of random pages: mapped in this process, or in a memfd."""

    def __init__(self, kind: str) -> None:
        self.data = os.urandom(2 * PAGES * P)
        if kind == "process":
            self._maps = [mmap.mmap(-1, PAGES * P) for _ in range(2)]
            for k, m in enumerate(self._maps):
                m[:] = self.data[k * PAGES * P : (k + 1) * PAGES * P]
            starts = [ffi.cast("uintptr_t", ffi.from_buffer(m)) for m in self._maps]
            self.layout = MemoryLayout(pid=os.getpid(), page_size=P,
                                       regions=tuple(Region(int(s), PAGES * P) for s in starts))
            self.memory = ProcessMemory(os.getpid(), P)
        else:
            fd = os.memfd_create("native-requests-test")
            os.write(fd, self.data)
            self.layout = MemoryLayout(pid=0, page_size=P, regions=(Region(0x10000000, PAGES * P),
                                                                    Region(0x30000000, PAGES * P)))
            self.memory = MemfdMemory(fd, self.layout.regions, P)
            os.close(fd)

    def page(self, address: int) -> bytes:
        for k, region in enumerate(self.layout.regions):
            if region.start <= address < region.end:
                offset = k * PAGES * P + address - region.start
                return self.data[offset : offset + P]
        raise AssertionError(hex(address))


def _loop(guest: _Guest):
    states = PageStates(guest.layout)
    states.set([(r.start, PAGES) for r in guest.layout.regions], STALE)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    native = NativeRequests(ours.detach(), guest.memory, states)
    return native, states, trio.socket.from_stdlib_socket(theirs)


@pytest.mark.parametrize("kind", ["process", "memfd"])
async def test_requests_are_answered_at_once_claimed_and_ended_by_the_end_record(kind):
    guest = _Guest(kind)
    native, states, peer = _loop(guest)
    first, second = guest.layout.regions
    states.set([(first.start + 8 * P, 2)], SENT)          # the push sent these already
    asks = [(first.start + 4 * P, 8), (second.start + (PAGES - 3) * P, 3), (first.start, 1)]
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(native.run)
                for address, count in asks:
                    await peer.send(RECORD.pack(address, count))
                    header = await _read_exactly(peer, RECORD.size)
                    assert RECORD.unpack(header) == (address, count)
                    body = await _read_exactly(peer, count * P)
                    assert body == b"".join(guest.page(address + k * P) for k in range(count))
                native.stop()
                assert RECORD.unpack(await _read_exactly(peer, RECORD.size)) == (lib.FAULT_END, 0)
    finally:
        native.close()
        peer.close()
    assert native.result == lib.FAULT_STOPPED
    stats = native.statistics()
    assert stats.requests == 3 and stats.claimed_pages == 10 and stats.duplicate_pages == 2
    assert stats.answered_bytes == 3 * 16 + (8 + 3 + 1) * P
    assert states.value_at(first.start + 4 * P) == SENT and states.value_at(first.start + 12 * P) == STALE
    assert states.count(STALE) == 2 * PAGES - 12
    digests, expected = PageDigests(2 * PAGES, P), PageDigests(2 * PAGES, P)
    native.record_digests(digests)
    claimed = [(first.start + 4 * P, 4), (first.start + 10 * P, 2), (second.start + (PAGES - 3) * P, 3), (first.start, 1)]
    for address, count in claimed:
        expected.record_runs(guest.layout, [(address, count)], b"".join(guest.page(address + k * P) for k in range(count)))
    assert digests.value() == expected.value()


@pytest.mark.parametrize("request_", [
    RECORD.pack(0x10000000 + PAGES * P, 1),
    RECORD.pack(0x10000000 + (PAGES - 1) * P, 2),
    RECORD.pack(0x10000000 + 12, 1),
    RECORD.pack(0x10000000, 0),
    RECORD.pack(0x10000000, lib.FAULT_MAX_PAGES + 1),
    RECORD.pack((1 << 64) - P, 2),
], ids=["between-regions", "across-a-region-end", "unaligned", "no-pages", "too-many-pages", "overflowing"])
async def test_a_hostile_request_is_refused_and_nothing_claimed(request_):
    guest = _Guest("memfd")
    native, states, peer = _loop(guest)
    try:
        await peer.send(request_)
        with trio.fail_after(WAIT), pytest.raises(RemoteProtocolError, match="outside the layout or too many"):
            await native.run()
    finally:
        native.close()
        peer.close()
    assert states.count(STALE) == 2 * PAGES


async def test_a_destination_that_closes_between_requests_ends_the_loop():
    guest = _Guest("memfd")
    native, _, peer = _loop(guest)
    try:
        peer.close()
        with trio.fail_after(WAIT), pytest.raises(TransportError, match="closed the urgent link"):
            await native.run()
    finally:
        native.close()


async def test_cancelling_aborts_without_the_end_record():
    guest = _Guest("memfd")
    native, _, peer = _loop(guest)
    try:
        with trio.fail_after(WAIT):
            with trio.move_on_after(0.2):
                await native.run()       # nothing comes: only the cancellation ends it
        with socket.socket(fileno=os.dup(peer.fileno())) as raw, pytest.raises(BlockingIOError):
            raw.recv(16, socket.MSG_DONTWAIT)      # open, and nothing was written: no end record
    finally:
        native.close()
        peer.close()
    assert native.result is None      # the call was cancelled: no result came back
