"""The destination's post-copy side of a restore guest's userfaultfd: which pages are missing,
the faults on them, and installing pages as they arrive.

The guest hands over its uffd (``attach``); ``register`` adds MISSING mode to its region; the
pages not current yet are marked (``mark_missing``) and the guest drops them (its ``discard``
command), so the guest's next touch of one waits in the kernel and is reported here
(``read_faults``). ``claim`` turns faults into requests for the source (a window of missing
pages from each fault, each page asked for once); ``install`` puts pages in with UFFDIO_COPY
(or UFFDIO_ZEROPAGE), waking whoever waits, and skips pages already current, so the urgent
answers and the background push may bring the same page in any order. ``finish`` drops MISSING
once nothing is missing, and the guest is trackable (WP_ASYNC) again, for a later migration.

Synchronous (the engines call it from worker threads); the page work is in C
(``migrator.native.pages``), atomic per page and without a lock: the fault path (``read_faults``
and ``claim``, one thread) and the push (``install``, any threads) run at once: a lock held
around each install made a fault wait for the push's copy in progress, which tripled its round
trip during a push (``scripts/bench_faults.py`` measures it).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable, Sequence

from ..core.errors import MigratorError, TrackerError
from ..core.model import MemoryLayout, Run
from ..core.pagestate import PageStates, page_index_pairs
from ..native.pages import ffi, lib
from ..tracker.userfault import EVENT_PAGEFAULT, MSG_SIZE, register_missing, register_wp_only

CURRENT, MISSING, REQUESTED = 0, 1, 2

READ_MESSAGES = 64               # uffd messages per read()
_MESSAGE = struct.Struct("=B7xQQ8x")   # struct uffd_msg: event, pagefault {flags, address, ptid}
assert _MESSAGE.size == MSG_SIZE


def parse_faults(data: bytes, page_size: int = 4096) -> list[int]:
    """The page-aligned addresses of the PAGEFAULT messages in ``data`` (whole 32-byte
    ``struct uffd_msg``), in order; other events are skipped. TrackerError if ``data`` is not
    whole messages (a read returns only whole ones)."""
    if len(data) % MSG_SIZE:
        raise TrackerError(f"userfaultfd messages are {MSG_SIZE} bytes each, not {len(data)} bytes")
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two")
    mask = ~(page_size - 1)
    return [address & mask for event, _flags, address in _MESSAGE.iter_unpack(data) if event == EVENT_PAGEFAULT]


class MissingPages:
    """A restore guest's uffd (owned: ``close`` closes it) and the state of each page of its
    ``layout``: CURRENT, MISSING (absent, nobody asked yet) or REQUESTED (asked of the source)."""

    def __init__(self, uffd: int, layout: MemoryLayout) -> None:
        self._fd: int | None = uffd
        self.layout = layout
        self.states = PageStates(layout)
        self.zero_filled = 0             # faulted pages, current here, that were absent: zero pages
        os.set_blocking(uffd, False)      # read_faults never waits (the guest made it so already)

    def __enter__(self) -> MissingPages:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def fileno(self) -> int:
        """The uffd, readable when faults are pending (for select/poll, ``trio.lowlevel.wait_readable``)."""
        if self._fd is None:
            raise ValueError("MissingPages is closed")
        return self._fd

    def close(self) -> None:
        """Close this copy of the uffd (idempotent). The guest keeps its own, so a MISSING
        registration outlives this object: a touch of a missing page waits until a new holder
        (``attach`` again) installs it. Installing a page wakes every touch waiting on it, also
        those whose fault message an earlier holder read and never answered."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def register(self) -> None:
        """MODE_MISSING | MODE_WP on every region (again is harmless). TrackerUnavailable names
        userfaultfd MISSING mode when the kernel refuses it."""
        register_missing(self.fileno(), self.layout.regions)

    def mark_missing(self, runs: Sequence[Run]) -> int:
        """The pages of ``runs`` (guest addresses) are not current: MISSING. Returns how many
        pages changed state (a REQUESTED page becomes MISSING again). EFAULT names a run outside."""
        return self.states.set(runs, MISSING)

    @property
    def missing(self) -> int:
        """Pages not CURRENT (missing or requested)."""
        return len(self.states.table) - self.states.count(CURRENT)

    def install(self, runs: Sequence[Run], payload) -> tuple[int, int]:
        """Install the pages of ``runs`` that are not current, from ``payload`` (the pages of the
        runs one after another, those skipped as current included) or as zero pages when it is
        None; one ioctl per stretch of non-current pages. A page the kernel finds present is
        taken as current. Returns (pages installed, of which REQUESTED). EFAULT names a run
        outside; OSError with the kernel's errno if an install fails (what came before it stays)."""
        pairs = self.states.checked_pairs(runs)
        pages = sum(pairs[1::2])
        if payload is not None and len(payload) != pages * self.layout.page_size:
            raise ValueError(f"install: {len(payload)} bytes for {pages} pages")
        counts = ffi.new("uint64_t[2]")
        buf = ffi.from_buffer(payload) if payload is not None else ffi.NULL
        rc = lib.uffd_install(self.fileno(), *self.states.c_arguments(), ffi.from_buffer("uint64_t[]", pairs),
                              len(runs), buf, int(payload is None), counts)
        if rc == lib.INSTALL_OUTSIDE:
            raise AssertionError("uffd_install refused runs that were checked")
        if rc < 0:
            verb = "UFFDIO_ZEROPAGE" if payload is None else "UFFDIO_COPY"
            raise OSError(-rc, f"{verb} of {len(runs)} runs from {runs[0][0]:#x} after {counts[0]} pages: "
                               f"{os.strerror(-rc)}")
        return counts[0], counts[1]

    def read_faults(self) -> list[int]:
        """Drain the pending uffd messages without waiting: the page-aligned addresses of the
        page faults among them ([] when none are pending)."""
        fd, addresses = self.fileno(), []
        while True:
            try:
                data = os.read(fd, READ_MESSAGES * MSG_SIZE)
            except BlockingIOError:
                return addresses
            except InterruptedError:
                continue
            addresses += parse_faults(data, self.layout.page_size)
            if len(data) < READ_MESSAGES * MSG_SIZE:
                return addresses

    def claim(self, addresses: Iterable[int], window: int) -> list[Run]:
        """For each address, its page and the ``window - 1`` after it (within its region) that
        are MISSING become REQUESTED; returns them as sorted, coalesced runs (each page asked
        for once, however many faults name it). EFAULT names an address outside the layout.

        A fault on a page that is CURRENT here was installed since it was reported, or is a
        page absent in the guest that no one ever wrote (it is zero: the source sends no
        never-touched pages, and the guest's populate may not have reached it): it gets a zero
        page, or its waiters a wake-up if it is present, so that no touch waits for a page
        nobody will ask for. ``zero_filled`` counts the pages that needed the zero page."""
        if window < 1:
            raise ValueError(f"claim: a window of {window} pages")
        ps = self.layout.page_size
        runs = []
        for address in sorted(set(addresses)):
            page = address - address % ps
            region = next((r for r in self.layout.regions if r.start <= page < r.end), None)
            if region is None:
                raise OSError(errno.EFAULT, f"fault at {address:#x} lies outside the layout")
            runs.append((page, min(window, (region.end - page) // ps)))
        current = [page for page, _ in runs if self.states.value_at(page) == CURRENT]
        if current:
            filled = lib.uffd_zero_fill(self.fileno(), ffi.new("uint64_t[]", current), len(current), ps)
            if filled < 0:
                raise OSError(-filled, f"UFFDIO_ZEROPAGE of {len(current)} faulted pages from {current[0]:#x}: "
                                       f"{os.strerror(-filled)}")
            self.zero_filled += filled
        return self.states.claim(runs, MISSING, REQUESTED)

    def finish(self) -> None:
        """Drop MISSING mode: every region registered MODE_WP alone, WP_ASYNC-trackable again.
        MigratorError while pages are missing (the guest would read zeros there)."""
        missing = self.missing
        if missing:
            raise MigratorError(f"post-copy cannot finish: {missing} pages are still missing")
        register_wp_only(self.fileno(), self.layout.regions)


def guest_page_pairs(layout: MemoryLayout, runs: Sequence[Run]) -> bytes:
    """Address runs of ``layout`` as the native 64-bit (first region page, count) pairs that
    ``GuestClient.discard`` takes (a restore guest has one region; pages are counted across
    regions as ``MemoryLayout.page_indices`` counts them). EFAULT names a run outside."""
    return page_index_pairs(layout, runs)
