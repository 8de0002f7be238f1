"""``sync-wp``: classic synchronous userfaultfd write-protect with a resolver thread (baseline).

The guest registered its regions on a userfaultfd without WP_ASYNC
(``register_for_tracking(regions, "sync")``). After ``arm`` write-protects the regions, each first
write to a page stops the writing thread in the kernel and queues a ``uffd_msg``; the resolver
thread here reads many messages per ``read()``, records the pages and unprotects them
(UFFDIO_WRITEPROTECT mode 0, which wakes the writer). That costs the guest ~4 us per first write
on the same CPU and ~50-60 us across CPUs: the figure ``wp-async`` is measured against. It is also
the fallback for kernels with userfaultfd write-protect (5.7+) but without WP_ASYNC.

Why no write is lost (page contents are read only after ``collect`` returns):

Invariant: a page that is not write-protected is in the current ``dirty`` set. ``arm`` protects
every page and empties the set; the resolver *records* a page before it *unprotects* it; ``collect``
swaps the set out and re-protects exactly those pages. The resolver's record+unprotect and
``collect``'s swap+re-protect hold the same lock, so they never interleave (otherwise the resolver
could unprotect a page ``collect`` had just swapped out and re-protected, leaving it writable and
unrecorded: every later write to it would be lost).

Take a write to page p at time t. If p is protected at t, the write faults and completes only
after the resolver recorded p (in the set some later ``collect`` swaps out). If p is unprotected at
t, p is in the current set by the invariant. Either way the first ``collect`` to swap p out after
t reports p; if it swapped before the write actually landed, its re-protect makes the woken writer
fault again (p lands in the next set), and if the write landed before the re-protect, the read
that follows ``collect`` sees it. A fault message read just before a swap is recorded after it:
p is reported one round later, never dropped. Writes during ``collect`` wait for the lock.

``close`` unprotects every region first (waking any blocked writer), then stops the thread, so
the guest never stays blocked on a page nobody will resolve.

Needs: ptrace read rights over the guest (for ``populated``), a uffd the guest registered in
sync mode.
"""

from __future__ import annotations

import errno
import os
import select
import threading

from ..core.errors import TrackerError, TrackerUnavailable
from ..core.model import Run
from . import _sys
from .base import TrackerBase
from ._uapi import (
    UFFD_EVENT_PAGEFAULT,
    UFFD_MSG_SIZE,
    UFFD_PAGEFAULT_FLAG_WP,
)

MESSAGES_PER_READ = 256
STOP_TIMEOUT_S = 5.0


def pages_to_runs(pages: list[int], page_size: int) -> list[Run]:
    """Sorted, coalesced runs of page addresses (the sync-wp set is per page by nature)."""
    runs: list[Run] = []
    for address in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] * page_size == address:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((address, 1))
    return runs


def parse_fault_pages(data: bytes, page_size: int) -> list[int]:
    """Page addresses of the write-protect fault messages in ``data`` (whole ``uffd_msg``s)."""
    pages = []
    mask = ~(page_size - 1)
    for offset in range(0, len(data) - UFFD_MSG_SIZE + 1, UFFD_MSG_SIZE):
        if data[offset] != UFFD_EVENT_PAGEFAULT:
            continue  # no other event was requested at registration
        flags = int.from_bytes(data[offset + 8 : offset + 16], "little")
        if flags & UFFD_PAGEFAULT_FLAG_WP:
            pages.append(int.from_bytes(data[offset + 16 : offset + 24], "little") & mask)
    return pages


class SyncWpTracker(TrackerBase):
    name = "sync-wp"
    marks_unpopulated = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._dirty: set[int] = set()  # pages unprotected since the last arm/collect
        self._dirty_lock = threading.Lock()  # record+unprotect vs swap+re-protect (see above)
        self._error: BaseException | None = None  # what ended the resolver thread
        self._thread: threading.Thread | None = None

    def check_mode(self) -> None:
        """TrackerUnavailable unless the regions are registered in *synchronous* WP mode."""
        for region in self.regions:
            if self._registered_wp_async(region):
                raise TrackerUnavailable(
                    f"[{region.start:#x}, {region.end:#x}) of process {self.pid} is registered with WP_ASYNC; "
                    "sync-wp needs register_for_tracking(regions, 'sync')"
                )
            try:  # unprotecting what is not protected changes nothing, but needs a WP registration
                _sys.uffdio_writeprotect(self.uffd, region.start, region.length, protect=False)
                self._uffd_ioctls += 1
            except OSError as exc:
                raise TrackerUnavailable(
                    f"[{region.start:#x}, {region.end:#x}) of process {self.pid} is not registered for "
                    f"write-protect on the given uffd ({exc}); the guest must call "
                    "register_for_tracking(regions, 'sync') and hand over that uffd"
                ) from exc

    def start(self) -> None:
        """Start the resolver thread (after ``check_mode``)."""
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._resolve_loop, name=f"sync-wp resolver pid {self.pid}",
                                        daemon=True)
        self._thread.start()

    # --- tracker operations ------------------------------------------------------------------------

    def _arm(self) -> None:
        self._raise_resolver_error()
        with self._dirty_lock:
            self._dirty = set()
            for region in self.regions:
                _sys.uffdio_writeprotect(self.uffd, region.start, region.length, protect=True)
                self._uffd_ioctls += 1

    def _collect(self, within=None) -> tuple[list[Run], int]:
        self._raise_resolver_error()
        with self._dirty_lock:
            pages, self._dirty = self._dirty, set()
            runs = pages_to_runs(list(pages), self.page_size)
            for address, count in runs:
                _sys.uffdio_writeprotect(self.uffd, address, count * self.page_size, protect=True)
            self._uffd_ioctls += len(runs)
        return runs, len(pages)

    def _release(self) -> None:
        try:
            for region in self.regions:
                try:
                    _sys.uffdio_writeprotect(self.uffd, region.start, region.length, protect=False)
                except OSError:
                    pass  # the guest is gone or unmapped the range: nobody left to wake
        finally:
            if self._thread is not None:
                os.write(self._wake_w, b"x")
                self._thread.join(STOP_TIMEOUT_S)
                os.close(self._wake_r)
                os.close(self._wake_w)

    # --- the resolver thread -----------------------------------------------------------------------

    def _resolve_loop(self) -> None:
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    return
                try:
                    data = os.read(self.uffd, UFFD_MSG_SIZE * MESSAGES_PER_READ)
                except BlockingIOError:
                    continue  # another reader (or a spurious wake-up) took the messages
                self._resolve(parse_fault_pages(data, self.page_size))
        except BaseException as exc:  # reported by the next arm()/collect(); the thread ends
            self._error = exc

    def _resolve(self, pages: list[int]) -> None:
        if not pages:
            return
        with self._dirty_lock:
            self._dirty.update(pages)
            self._faults += len(pages)
            for address, count in pages_to_runs(pages, self.page_size):
                try:
                    _sys.uffdio_writeprotect(self.uffd, address, count * self.page_size, protect=False)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:  # ENOENT: the guest unmapped it meanwhile
                        raise
                self._uffd_ioctls += 1

    def _raise_resolver_error(self) -> None:
        if self._error is not None:
            raise TrackerError(f"sync-wp resolver thread of process {self.pid} failed: {self._error}") from self._error
