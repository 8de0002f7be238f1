"""Batched cross-process memory access, on this process and a child."""

import errno
import mmap
import os

import pytest

from migrator.core.digest import hash_pages_into, new_hashes
from migrator.core.model import Region
from migrator.native.pages import lib as pages_lib
from migrator.tracker._uapi import ffi
from migrator.tracker.memory import MemfdMemory, ProcessMemory

P = 4096


def _mapping(pages: int):
    m = mmap.mmap(-1, pages * P)
    m[:] = os.urandom(pages * P)
    return m, int(ffi.cast("uintptr_t", ffi.from_buffer(m)))


def test_read_runs_concatenates_scattered_runs_beyond_one_calls_iovecs():
    pages = 3 * pages_lib.IOV_BATCH
    m, base = _mapping(pages)
    runs = [(base + i * P, 1) for i in range(0, pages, 2)] + [(base + (pages - 1) * P, 1)]
    data = ProcessMemory(os.getpid()).read_runs(runs)
    expected = b"".join(m[a - base : a - base + P] for a, _ in runs)
    assert data == expected


def test_write_runs_then_read_back():
    m, base = _mapping(64)
    memory = ProcessMemory(os.getpid())
    runs = [(base + P, 3), (base + 10 * P, 1), (base + 40 * P, 5)]
    payload = os.urandom(9 * P)
    memory.write_runs(runs, payload)
    assert memory.read_runs(runs) == payload
    assert m[P : 4 * P] == payload[: 3 * P]
    with pytest.raises(ValueError):
        memory.write_runs(runs, payload[:-1])


def test_unmapped_span_is_an_oserror_naming_the_call():
    m, base = _mapping(4)
    memory = ProcessMemory(os.getpid())
    with pytest.raises(OSError) as info:
        memory.read_runs([(base, 4), (8 * P, 1)])  # address 0x8000 is never mapped
    assert info.value.errno in (errno.EFAULT, errno.ENOMEM) and "process_vm_readv" in str(info.value)


def _memfd_mapping(pages: int = 16):
    """A memfd of random pages mapped here: (fd, mapping, its address)."""
    fd = os.memfd_create("t")
    os.ftruncate(fd, pages * P)
    m = mmap.mmap(fd, pages * P)
    m[:] = os.urandom(pages * P)
    return fd, m, int(ffi.cast("uintptr_t", ffi.from_buffer(m)))


def test_memfd_memory_matches_process_memory():
    fd, m, base = _memfd_mapping()
    runs = [(base + 2 * P, 2), (base + 9 * P, 1)]
    via_fd = MemfdMemory(fd, [Region(base, 16 * P)], writable=True)
    assert via_fd.read_runs(runs) == ProcessMemory(os.getpid()).read_runs(runs)
    via_fd.write_runs([(base, 1)], b"\x05" * P)
    assert m[:P] == b"\x05" * P
    via_fd.close()
    os.close(fd)


def test_transfers_past_one_call_are_cut_into_calls_the_kernel_moves_whole(monkeypatch):
    """The kernel moves at most MAX_RW_COUNT (just under 2 GiB) per call and reports the rest as
    not moved; reads and writes above MAX_CALL_BYTES are cut. Shown with the bound lowered to
    a few pages, on real process_vm_readv/writev calls."""
    from migrator.tracker import memory as module

    monkeypatch.setattr(module, "MAX_CALL_BYTES", 3 * P)
    m, base = _mapping(32)
    memory = ProcessMemory(os.getpid())
    runs = [(base, 10), (base + 12 * P, 1), (base + 14 * P, 2), (base + 20 * P, 7)]
    assert memory.read_runs(runs) == b"".join(m[a - base : a - base + n * P] for a, n in runs)
    payload = os.urandom(20 * P)
    memory.write_runs(runs, payload)
    assert memory.read_runs(runs) == payload
    assert memory.read(base + P, 5 * P + 7) == m[P : 6 * P + 7]


def test_translated_memory_moves_runs_of_another_layout_at_the_same_offsets():
    """The destination writes the source's runs straight into the restore guest: each run's
    address is taken in the source layout and moved at its offset in the same region here. A
    run outside the source layout's regions moves nothing past it and is an EFAULT."""
    from migrator.core.model import MemoryLayout

    m, base = _mapping(16)
    here = MemoryLayout(pid=os.getpid(), page_size=P, regions=(Region(base, 8 * P), Region(base + 8 * P, 8 * P)))
    there = MemoryLayout(pid=1, page_size=P, regions=(Region(0x100000, 8 * P), Region(0x900000, 8 * P)))
    memory = ProcessMemory(os.getpid()).translated(there, here)
    runs = [(0x100000 + 2 * P, 2), (0x900000 + 7 * P, 1)]
    payload = os.urandom(3 * P)
    memory.write_runs(runs, payload)
    assert m[2 * P : 4 * P] == payload[: 2 * P] and m[15 * P : 16 * P] == payload[2 * P :]
    assert memory.read_runs(runs) == payload
    for bad in ([(0x100000 + 7 * P, 2)], [(base, 1)]):
        with pytest.raises(OSError, match="range not mapped") as info:
            memory.read_runs(bad)
        assert info.value.errno == errno.EFAULT


def test_memfd_copies_runs_across_regions_and_refuses_pages_outside_them():
    """Two regions laid one after the other in the memfd; runs in either are copied in one
    native pass; a run reaching past its region, or wrapping around, copies nothing past it."""
    fd = os.memfd_create("t")
    os.ftruncate(fd, 12 * P)
    m = mmap.mmap(fd, 12 * P)
    m[:] = os.urandom(12 * P)
    first, second = Region(0x100000, 8 * P), Region(0x900000, 4 * P)
    memory = MemfdMemory(fd, [first, second], writable=True)
    runs = [(first.start + P, 2), (second.start + 3 * P, 1), (first.start + 7 * P, 1)]
    assert memory.read_runs(runs) == m[P : 3 * P] + m[11 * P : 12 * P] + m[7 * P : 8 * P]
    payload = os.urandom(4 * P)
    memory.write_runs(runs, payload)
    assert memory.read_runs(runs) == payload and m[11 * P : 12 * P] == payload[2 * P : 3 * P]
    for bad in ([(first.start + 7 * P, 2)], [(second.start - P, 1)], [(2**64 - P, 1)]):
        with pytest.raises(OSError, match="outside the guest's regions") as info:
            memory.read_runs(bad, bytearray(8 * P))
        assert info.value.errno == errno.EFAULT
    with pytest.raises(ValueError):
        memory.read_runs(runs, bytearray(P))
    with pytest.raises(ValueError):             # more pages than the buffer, before any copy
        memory.read_runs([(first.start, 2**62)], bytearray(8 * P))
    reader = MemfdMemory(fd, [first, second])
    with pytest.raises(OSError, match="read-only"):
        reader.write_runs(runs, payload)
    reader.close()
    memory.close()
    os.close(fd)


def _hashes_of(data: bytes):
    hashes = new_hashes(len(data) // P)
    hash_pages_into(data, len(hashes), P, hashes)
    return hashes


def test_transfers_hash_each_page_as_it_moves_across_call_boundaries():
    per_call = pages_lib.HASHED_CALL_BYTES // P
    m, base = _mapping(4 * per_call)
    # one-page runs, then a run longer than one hashed call: cut across calls mid-run
    runs = [(base + i * P, 1) for i in range(0, per_call, 3)] + [(base + per_call * P, 2 * per_call + 5)]
    memory = ProcessMemory(os.getpid())
    hashes = new_hashes(sum(n for _, n in runs))
    data = memory.read_runs(runs, hashes=hashes)
    assert data == memory.read_runs(runs) and hashes == _hashes_of(data)
    assert len(set(hashes)) == len(hashes), "every page hashed, none left zero"

    payload = os.urandom(len(data))
    written = new_hashes(len(hashes))
    memory.write_runs(runs, payload, hashes=written)
    assert memory.read_runs(runs) == payload and written == _hashes_of(payload)
    with pytest.raises(ValueError, match="hashes for"):
        memory.read_runs(runs, hashes=new_hashes(len(hashes) - 1))


def test_memfd_memory_lends_adjacent_runs_in_place_and_nothing_else():
    """Runs next to each other in one region come back as one live view of the mapping (a
    write shows through it); runs with a gap, or past their region's end, are not lent."""
    fd = os.memfd_create("t")
    os.ftruncate(fd, 12 * P)
    m = mmap.mmap(fd, 12 * P)
    m[:] = os.urandom(12 * P)
    first, second = Region(0x100000, 8 * P), Region(0x108000, 4 * P)   # adjacent in memory too
    memory = MemfdMemory(fd, [first, second])
    lent = memory.lend([(first.start + P, 2), (first.start + 3 * P, 3)])
    assert lent is not None and lent.readonly and bytes(lent) == m[P : 6 * P]
    m[2 * P] ^= 0xFF                                    # the guest writes: the lent bytes change
    assert lent[P] == m[2 * P]
    assert bytes(memory.lend([(second.start, 4)])) == m[8 * P : 12 * P]
    assert memory.lend([(first.start, 1), (first.start + 2 * P, 1)]) is None      # a gap
    assert memory.lend([(first.start + 7 * P, 2)]) is None                        # past the region
    assert memory.lend([]) is None
    del lent
    memory.close()
    os.close(fd)


def test_memfd_memory_hashes_like_process_memory():
    fd, m, base = _memfd_mapping()
    runs = [(base + 2 * P, 2), (base + 9 * P, 1)]
    via_fd, via_pid = MemfdMemory(fd, [Region(base, 16 * P)], writable=True), ProcessMemory(os.getpid())
    a, b = new_hashes(3), new_hashes(3)
    assert via_fd.read_runs(runs, hashes=a) == via_pid.read_runs(runs, hashes=b) and a == b
    payload, written = os.urandom(3 * P), new_hashes(3)
    via_fd.write_runs(runs, payload, hashes=written)
    assert written == _hashes_of(payload) and via_pid.read_runs(runs) == payload
