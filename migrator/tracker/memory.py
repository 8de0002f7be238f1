"""Batched access to another process's memory (process_vm_readv / process_vm_writev).

Moving pages one syscall per page costs more than the copy, so runs are gathered into iovec
arrays of up to IOV_MAX entries per call. Needs ptrace-attach rights over the target (same user
and a parent or PR_SET_PTRACER, or CAP_SYS_PTRACE); without them the kernel answers EPERM.
"""

from __future__ import annotations

import errno
from array import array

from ..core.digest import hash_pages_into
from ..core.model import Run
from ..core.runs import count_pages, words
from ..native.pages import ffi as pages_ffi
from ..native.pages import lib as pages_lib
from . import _sys
from ._uapi import MADV_POPULATE_READ, MADV_POPULATE_WRITE


class ProcessMemory:
    """Read and write page runs of process ``pid``. Thread-safe: it keeps no per-call state.

    The iovec arrays are built and the calls made in one native pass (``vm_transfer``): late
    rounds hold tens of thousands of one-page runs, and building their iovecs in Python cost
    more than moving their pages. With ``remap`` ((start, length, target start) triples, see
    ``translated``) run addresses are taken in another layout's terms and moved at the same
    offsets of this process's regions.
    """

    def __init__(self, pid: int, page_size: int = 4096, *, remap: list[tuple[int, int, int]] | None = None) -> None:
        self.pid = pid
        self.page_size = page_size
        self._remap = remap or []
        self._regions = pages_ffi.new("uint64_t[]", [n for triple in self._remap for n in triple] or [0])

    def translated(self, layout, onto) -> ProcessMemory:
        """The same process's memory, with run addresses of ``layout`` moved at the same offsets
        of ``onto`` (this process's layout, of the same shape)."""
        if [r.length for r in layout.regions] != [r.length for r in onto.regions]:
            raise ValueError("translated: the layouts differ in shape")
        return ProcessMemory(self.pid, self.page_size,
                             remap=[(r.start, r.length, o.start) for r, o in zip(layout.regions, onto.regions)])

    def read_runs(self, runs: list[Run], out: bytearray | memoryview | None = None, *,
                  hashes: array | None = None) -> bytearray | memoryview:
        """Return the bytes of ``runs``, concatenated in order (into ``out`` when given). With
        ``hashes`` (``core.digest.new_hashes``), each page is hashed into it as it is read, while
        it is in the cache (for ``PageDigests.record_hashes``)."""
        total = count_pages(runs) * self.page_size
        if out is None:
            out = bytearray(total)
        self._transfer(runs, out, total, self.page_size, write=False, hashes=hashes)
        return out

    def write_runs(self, runs: list[Run], data, *, hashes: array | None = None) -> None:
        """Write ``data`` (the concatenated pages of ``runs``) into the process; ``hashes`` as
        ``read_runs``' (each page hashed right after it is written)."""
        total = count_pages(runs) * self.page_size
        if len(data) != total:
            raise ValueError(f"write_runs: {len(data)} bytes for {total // self.page_size} pages")
        self._transfer(runs, data, total, self.page_size, write=True, hashes=hashes)

    def native_reader(self) -> tuple:
        """(pid, map, regions, nregions): how a native loop reads these pages (see
        ``migrator/native/postcopy.h``: process_vm_readv of pid, at the remapped targets)."""
        return self.pid, pages_ffi.NULL, self._regions, len(self._remap)

    def read(self, address: int, length: int) -> bytearray:
        """Read one contiguous range (a region digest, a control block)."""
        out = bytearray(length)
        self._transfer([(address, length)], out, length, 1, write=False)
        return out

    def write(self, address: int, data) -> None:
        self._transfer([(address, len(data))], data, len(data), 1, write=True)

    def _transfer(self, runs, buf, total: int, unit: int, *, write: bool, hashes: array | None = None) -> None:
        """Move ``total`` bytes of ``buf`` to/from the runs (address, count of ``unit`` bytes)."""
        if total == 0:
            return
        if len(buf) < total:
            raise ValueError(f"{len(buf)} bytes for {total}")
        pairs = words(runs)
        if hashes is not None and len(hashes) != total // unit:
            raise ValueError(f"{len(hashes)} hashes for {total // unit} pages")
        done = pages_lib.vm_transfer(self.pid, self._regions, len(self._remap), pages_ffi.from_buffer("uint64_t[]", pairs),
                                     len(pairs) // 2, unit, pages_ffi.from_buffer(buf, require_writable=not write),
                                     int(write), MAX_CALL_BYTES,
                                     pages_ffi.from_buffer("uint64_t[]", hashes) if hashes is not None else pages_ffi.NULL)
        verb = "process_vm_writev" if write else "process_vm_readv"
        what = f"{verb} pid {self.pid} [{runs[0][0]:#x}.., {len(runs)} runs, {total} bytes]"
        if done < 0:
            raise _sys.os_error(-done, what)
        if done != total:
            # A short transfer means part of a run is not mapped in the target (or, remapped,
            # lies outside the regions).
            raise OSError(errno.EFAULT, f"{what}: moved {done} of {total} bytes (range not mapped)")


MAX_CALL_BYTES = 1 << 30   # per call: the kernel stops at MAX_RW_COUNT, just under 2 GiB


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
        self._owner = True

    def translated(self, layout, onto) -> MemfdMemory:
        """The same mapping, with run addresses of ``layout`` taken at the same offsets of
        ``onto`` (the guest's own layout, whose regions this view was made with). It shares the
        mapping: only the original's ``close`` releases it."""
        if [r.length for r in layout.regions] != [r.length for r in onto.regions]:
            raise ValueError("translated: the layouts differ in shape")
        view = object.__new__(MemfdMemory)
        view.__dict__.update(self.__dict__)
        view._regions = list(layout.regions)
        view._region_table = pages_ffi.new("uint64_t[]", [n for r, o in zip(layout.regions, self._offsets)
                                                          for n in (r.start, r.length, o)])
        view._owner = False
        return view

    def _offset(self, address: int) -> int:
        return self._place(address)[0]

    def _place(self, address: int) -> tuple[int, int]:
        """``address``'s offset in the mapping and the end of its region's part of it."""
        for region, offset in zip(self._regions, self._offsets):
            if region.start <= address < region.end:
                return offset + address - region.start, offset + region.length
        raise OSError(errno.EFAULT, f"memfd: address {address:#x} outside the guest's regions")

    def read_runs(self, runs: list[Run], out=None, *, hashes: array | None = None):
        """As ``ProcessMemory.read_runs`` (the pages hashed from ``out`` after the copy)."""
        total = count_pages(runs) * self.page_size
        if out is None:
            out = bytearray(total)
        self._copy(runs, out, total, into_map=False)
        if hashes is not None:
            hash_pages_into(out, total // self.page_size, self.page_size, hashes)
        return out

    def write_runs(self, runs: list[Run], data, *, hashes: array | None = None) -> None:
        if not self._writable:
            raise OSError(errno.EACCES, "memfd: this view of the guest's memory is read-only")
        pages = count_pages(runs)
        if hashes is not None:
            hash_pages_into(data, pages, self.page_size, hashes)
        self._copy(runs, data, pages * self.page_size, into_map=True)

    def _copy(self, runs: list[Run], buf, total: int, *, into_map: bool) -> None:
        """One native pass over the runs (a Python slice per run cost more than its page)."""
        if len(buf) < total:
            raise ValueError(f"{len(buf)} bytes for {total}")
        if not runs:
            return
        pairs = words(runs)
        done = pages_lib.copy_runs(self._base, self._region_table, len(self._regions), pages_ffi.from_buffer("uint64_t[]", pairs),
                                   len(runs), self.page_size, pages_ffi.from_buffer(buf, require_writable=not into_map),
                                   int(into_map))
        if done != len(runs):
            address, count = runs[done]
            raise OSError(errno.EFAULT, f"memfd: pages {address:#x}+{count} outside the guest's regions")

    def native_reader(self) -> tuple:
        """(pid, map, regions, nregions), as ``ProcessMemory.native_reader``: copied out of the mapping."""
        return 0, self._base, self._region_table, len(self._regions)

    def native_writer(self) -> tuple:
        """(map, regions, nregions): where native code writes these pages (the ``copy_runs``
        family in ``migrator/native/pages.h``); the mapping lives while this view's owner is open."""
        if not self._writable:
            raise OSError(errno.EACCES, "memfd: this view of the guest's memory is read-only")
        return self._base, self._region_table, len(self._regions)

    def read(self, address: int, length: int) -> bytes:
        return bytes(self.view(address, length))

    def view(self, address: int, length: int) -> memoryview:
        """The live bytes at ``address``, without a copy (they change while the guest runs)."""
        o = self._offset(address)
        return self._view[o : o + length]

    def lend(self, runs: list[Run]) -> memoryview | None:
        """The runs' pages as one live view of the mapping, when they lie next to each other in
        it (else None: the caller copies them). No copy: the bytes change while the guest runs."""
        if not runs:
            return None
        length = count_pages(runs) * self.page_size
        last, count = runs[-1]
        if last + count * self.page_size - runs[0][0] != length:   # sorted runs with gaps between
            return None
        offset, region_end = self._place(runs[0][0])
        return self._view[offset : offset + length] if offset + length <= region_end else None

    def views_of(self, runs: list[Run]) -> list[memoryview]:
        """Writable views of the runs' pages in the mapping, in order, a run next to the one
        before it in the mapping joined to its view: where a receiver puts a batch's payload."""
        if not self._writable:
            raise OSError(errno.EACCES, "memfd: this view of the guest's memory is read-only")
        views, start, end = [], -1, -1
        for address, count in runs:
            offset, region_end = self._place(address)
            length = count * self.page_size
            if offset + length > region_end:
                raise OSError(errno.EFAULT, f"memfd: pages {address:#x}+{count} outside the guest's regions")
            if offset == end:
                end += length
                continue
            if end > start:
                views.append(self._view[start:end])
            start, end = offset, offset + length
        if end > start:
            views.append(self._view[start:end])
        return views

    def populate(self) -> None:
        """Map every page of the memfd here now (MADV_POPULATE_READ/WRITE, Linux 5.14+) rather
        than on first touch, a fault per page (~0.3 s per GiB here) inside whatever copy
        touches it first. Best effort: an older kernel maps them on first touch as before."""
        try:
            self._map.madvise(MADV_POPULATE_WRITE if self._writable else MADV_POPULATE_READ)
        except OSError:
            pass

    def close(self) -> None:
        """Unmap, or (views from ``views_of`` or ``lend`` still held: a failed session's frames
        in flight) leave the mapping to go with the last of them."""
        if not self._owner:
            return
        pages_ffi.release(self._mapped)
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            pass    # views still alive: the mapping goes with the last of them
