"""Batched access to another process's memory (process_vm_readv / process_vm_writev).

Moving pages one syscall per page costs more than the copy, so runs are gathered into iovec
arrays of up to IOV_MAX entries per call. Needs ptrace-attach rights over the target (same user
and a parent or PR_SET_PTRACER, or CAP_SYS_PTRACE); without them the kernel answers EPERM.
"""

from __future__ import annotations

import errno
from array import array
from itertools import accumulate, chain

from ..core.model import Run
from ..native.pages import ffi as pages_ffi
from ..native.pages import lib as pages_lib
from . import _sys
from ._uapi import IOV_MAX, MADV_POPULATE_READ, MADV_POPULATE_WRITE, ffi


class ProcessMemory:
    """Read and write page runs of process ``pid``. Thread-safe: it keeps no per-call state."""

    def __init__(self, pid: int, page_size: int = 4096) -> None:
        self.pid = pid
        self.page_size = page_size

    def read_runs(self, runs: list[Run], out: bytearray | memoryview | None = None) -> bytearray | memoryview:
        """Return the bytes of ``runs``, concatenated in order (into ``out`` when given)."""
        total = sum(n for _, n in runs) * self.page_size
        if out is None:
            out = bytearray(total)
        self._transfer(runs, out, total, write=False)
        return out

    def write_runs(self, runs: list[Run], data) -> None:
        """Write ``data`` (the concatenated pages of ``runs``) into the process."""
        total = sum(n for _, n in runs) * self.page_size
        if len(data) != total:
            raise ValueError(f"write_runs: {len(data)} bytes for {total // self.page_size} pages")
        self._transfer(runs, data, total, write=True)

    def read(self, address: int, length: int) -> bytearray:
        """Read one contiguous range (a region digest, a control block)."""
        out = bytearray(length)
        self._transfer_iov([address], [length], out, length, write=False)
        return out

    def write(self, address: int, data) -> None:
        self._transfer_iov([address], [len(data)], data, len(data), write=True)

    def _transfer(self, runs: list[Run], buf, total: int, *, write: bool) -> None:
        ps = self.page_size
        self._transfer_iov([a for a, _ in runs], [n * ps for _, n in runs], buf, total, write=write)

    def _transfer_iov(self, addresses: list[int], lengths: list[int], buf, total: int, *, write: bool) -> None:
        """Move ``buf`` to/from the spans (addresses[i], lengths[i]), IOV_MAX spans per call.

        The iovec arrays are filled from interleaved ``array('Q')`` copies, not field by field:
        scattered rounds hold tens of thousands of one-page spans. A call moves at most
        MAX_CALL_BYTES (the kernel stops at MAX_RW_COUNT, just under 2 GiB, as if the rest were
        not mapped), so larger transfers are cut into spans and calls below it.
        """
        if total == 0:
            return
        if total > MAX_CALL_BYTES:
            addresses, lengths = _cut(addresses, lengths)
        local_base = int(ffi.cast("uintptr_t", ffi.from_buffer(buf, require_writable=not write)))
        locals_ = array("Q", accumulate(lengths[:-1], initial=local_base))
        call = _sys.process_vm_writev if write else _sys.process_vm_readv
        verb = "process_vm_writev" if write else "process_vm_readv"
        count = min(len(addresses), IOV_MAX)
        local = ffi.new("struct iovec[]", count)
        remote = ffi.new("struct iovec[]", count)
        pairs = array("Q", bytes(16 * count))
        first = 0
        while first < len(addresses):
            n = min(IOV_MAX, len(addresses) - first)
            if total > MAX_CALL_BYTES:
                n = _fitting(lengths, first, n)
            span_lengths = array("Q", lengths[first : first + n])
            pairs[0 : 2 * n : 2] = locals_[first : first + n]
            pairs[1 : 2 * n : 2] = span_lengths
            ffi.memmove(local, pairs, 16 * n)
            pairs[0 : 2 * n : 2] = array("Q", addresses[first : first + n])
            ffi.memmove(remote, pairs, 16 * n)
            want = sum(span_lengths)
            what = f"{verb} pid {self.pid} [{addresses[first]:#x}.., {n} spans, {want} bytes]"
            done = call(self.pid, local, remote, n, what=what)
            if done != want:
                # A partial transfer means part of a span is not mapped in the target.
                raise OSError(errno.EFAULT, f"{what}: moved {done} of {want} bytes (range not mapped)")
            first += n


MAX_CALL_BYTES = 1 << 30


def _cut(addresses: list[int], lengths: list[int]) -> tuple[list[int], list[int]]:
    """The same spans, none longer than MAX_CALL_BYTES."""
    cut_addresses, cut_lengths = [], []
    for address, length in zip(addresses, lengths):
        for offset in range(0, length, MAX_CALL_BYTES):
            cut_addresses.append(address + offset)
            cut_lengths.append(min(MAX_CALL_BYTES, length - offset))
    return cut_addresses, cut_lengths


def _fitting(lengths: list[int], first: int, n: int) -> int:
    """How many of the ``n`` spans from ``first`` one call moves within MAX_CALL_BYTES (at least one)."""
    moved = 0
    for k, length in enumerate(lengths[first : first + n]):
        moved += length
        if moved > MAX_CALL_BYTES:
            return max(k, 1)
    return n


class MemfdMemory:
    """The same interface over a guest's shared memfd, mapped here: one copy, no syscalls.

    ``regions`` are the guest's regions in the order they sit in the memfd (offset 0 first).
    """

    def __init__(self, memfd: int, regions, page_size: int = 4096, *, writable: bool = False) -> None:
        import mmap

        self.page_size = page_size
        self._regions = list(regions)
        size = sum(r.length for r in self._regions)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._writable = writable
        self._map = mmap.mmap(memfd, size, mmap.MAP_SHARED, prot)
        self._view = memoryview(self._map)
        offsets, offset = [], 0
        for r in self._regions:
            offsets.append(offset)
            offset += r.length
        self._offsets = offsets
        self._region_table = pages_ffi.new("uint64_t[]", [n for r, o in zip(self._regions, offsets)
                                                          for n in (r.start, r.length, o)])
        self._mapped = pages_ffi.from_buffer(self._map, require_writable=writable)   # released by close()
        self._base = pages_ffi.cast("uint8_t *", self._mapped)

    def _offset(self, address: int) -> int:
        for region, offset in zip(self._regions, self._offsets):
            if region.start <= address < region.end:
                return offset + address - region.start
        raise OSError(errno.EFAULT, f"memfd: address {address:#x} outside the guest's regions")

    def read_runs(self, runs: list[Run], out=None):
        total = sum(n for _, n in runs) * self.page_size
        if out is None:
            out = bytearray(total)
        self._copy(runs, out, total, into_map=False)
        return out

    def write_runs(self, runs: list[Run], data) -> None:
        if not self._writable:
            raise OSError(errno.EACCES, "memfd: this view of the guest's memory is read-only")
        self._copy(runs, data, sum(n for _, n in runs) * self.page_size, into_map=True)

    def _copy(self, runs: list[Run], buf, total: int, *, into_map: bool) -> None:
        """One native pass over the runs (a Python slice per run cost more than its page)."""
        if len(buf) < total:
            raise ValueError(f"{len(buf)} bytes for {total}")
        if not runs:
            return
        pairs = array("Q", chain.from_iterable(runs))
        done = pages_lib.copy_runs(self._base, self._region_table, len(self._regions), pages_ffi.from_buffer("uint64_t[]", pairs),
                                   len(runs), self.page_size, pages_ffi.from_buffer(buf, require_writable=not into_map),
                                   int(into_map))
        if done != len(runs):
            address, count = runs[done]
            raise OSError(errno.EFAULT, f"memfd: pages {address:#x}+{count} outside the guest's regions")

    def read(self, address: int, length: int) -> bytes:
        return bytes(self.view(address, length))

    def view(self, address: int, length: int) -> memoryview:
        """The live bytes at ``address``, without a copy (they change while the guest runs)."""
        o = self._offset(address)
        return self._view[o : o + length]

    def populate(self) -> None:
        """Map every page of the memfd here now (MADV_POPULATE_READ/WRITE, Linux 5.14+) rather
        than on first touch, a fault per page (~0.3 s per GiB here) inside whatever copy
        touches it first. Best effort: an older kernel maps them on first touch as before."""
        try:
            self._map.madvise(MADV_POPULATE_WRITE if self._writable else MADV_POPULATE_READ)
        except OSError:
            pass

    def close(self) -> None:
        pages_ffi.release(self._mapped)
        self._view.release()
        self._map.close()
