"""What every tracker shares: fd ownership, one lock, statistics, error wrapping, ``populated()``.

A subclass implements ``_arm()`` and ``_collect()`` (and ``_release()`` for its own resources).
Public calls are serialized by one lock, so a tracker may be driven from a worker thread while
another thread reads ``statistics()``. Kernel failures (``OSError`` naming the call, range and
errno) surface as ``TrackerError`` with the ``OSError`` as ``__cause__``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from ..core.errors import TrackerError
from ..core.model import Region, Run
from ..core.runs import union
from . import features, pagemap
from ._uapi import PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC
from .scan import DEFAULT_VEC_LEN, Scanner


@dataclass(frozen=True, slots=True)
class TrackerStats:
    """A tracker's counters since it was opened."""

    name: str
    arms: int             # arm() calls
    collects: int         # collect() calls
    pages_reported: int   # pages returned by all collect() calls
    last_pages: int       # pages returned by the last collect()
    scan_seconds: float   # time spent inside collect()
    last_scan_seconds: float
    ioctls: int           # PAGEMAP_SCAN and UFFDIO_* calls issued
    faults: int           # write faults resolved (sync-wp only)


class TrackerBase:
    """Base of the four trackers; see ``migrator.tracker.DirtyTracker`` for the contract."""

    name: ClassVar[str]
    # PAGEMAP_SCAN flags for populated(): wp-async adds PM_SCAN_CHECK_WPASYNC.
    populated_flags: ClassVar[int] = 0
    # arm() leaves uffd-wp markers on never-touched pages (see populated()).
    marks_unpopulated: ClassVar[bool] = False

    def _registered_wp_async(self, region: Region) -> bool:
        """Is ``region`` registered with WP_ASYNC? PM_SCAN_CHECK_WPASYNC answers EPERM when not,
        without touching a page (a write to a synchronously protected page would block)."""
        try:
            self._scanner.scan([region], flags=PM_SCAN_CHECK_WPASYNC, return_mask=PAGE_IS_WRITTEN, with_output=False)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                return False
            raise
        return True

    def __init__(self, *, pid: int, regions: tuple[Region, ...], page_size: int, pagemap_fd: int,
                 uffd: int | None, vec_len: int = DEFAULT_VEC_LEN) -> None:
        self.pid = pid
        self.regions = regions
        self.page_size = page_size
        self.pagemap_fd = pagemap_fd
        self.uffd = uffd
        self._scanner = Scanner(pagemap_fd, page_size=page_size, vec_len=vec_len)
        self._lock = threading.Lock()
        self._closed = False
        self._arms = self._collects = self._pages_reported = self._last_pages = 0
        self._scan_seconds = self._last_scan_seconds = 0.0
        self._uffd_ioctls = 0
        self._faults = 0
        self._data_at_arm: list[Run] | None = None  # populated() just before the last arm()

    # --- the contract ---------------------------------------------------------------------------

    def arm(self) -> None:
        with self._operation("arm"):
            if self.marks_unpopulated:
                self._data_at_arm = self._populated()
            self._arm()
            self._arms += 1

    def collect(self, within: tuple[Region, ...] | None = None) -> list[Run]:
        with self._operation("collect"):
            if within is not None:
                if not within:
                    return []      # nothing wanted: not even a walk
                outside = next((r for r in within if not any(region.contains(r.start, r.length) for region in self.regions)), None)
                if outside is not None:
                    raise ValueError(f"collect: [{outside.start:#x}, {outside.end:#x}) is not inside a tracked region")
            started = time.perf_counter()
            runs, pages = self._collect(within)
            elapsed = time.perf_counter() - started
            self._collects += 1
            self._pages_reported += pages
            self._last_pages = pages
            self._scan_seconds += elapsed
            self._last_scan_seconds = elapsed
            return runs

    def populated(self) -> list[Run]:
        """Pages holding data: present or swapped, not never-touched, not the shared zero page.

        Before ``arm`` one scan answers. After it, the uffd-wp markers that protection puts on
        never-touched pages read as "swapped" (PAGEMAP_SCAN and the classic pagemap alike), and so
        does a protected page that really is in swap. So after ``arm`` the answer is: pages
        present now (not the zero page), plus swapped pages written since their protection, plus
        protected swapped pages that held data when ``arm`` ran (a page swapped out after a
        ``collect`` reported it was sent then and is not listed again).
        """
        with self._operation("populated"):
            return self._populated()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._release()
            finally:
                for fd in (self.pagemap_fd, self.uffd):
                    if fd is not None:
                        os.close(fd)

    def statistics(self) -> TrackerStats:
        return TrackerStats(
            name=self.name,
            arms=self._arms,
            collects=self._collects,
            pages_reported=self._pages_reported,
            last_pages=self._last_pages,
            scan_seconds=self._scan_seconds,
            last_scan_seconds=self._last_scan_seconds,
            ioctls=self._scanner.ioctls + self._uffd_ioctls,
            faults=self._faults,
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.name} pid={self.pid} regions={len(self.regions)} {state}>"

    # --- for subclasses ---------------------------------------------------------------------------

    @staticmethod
    def kernel_missing() -> str | None:
        """Why this kernel cannot run the tracker at all (checked before anything is opened)."""
        return None

    def check_mode(self) -> None:
        """Raise TrackerUnavailable if the guest's registration does not suit this tracker."""

    def start(self) -> None:
        """Start background work (after ``check_mode``); ``close`` stops it."""

    def _populated(self) -> list[Run]:
        classic = features.pagemap_scan_missing() is not None
        if self._data_at_arm is None:
            if classic:
                return self._classic(pagemap.POPULATED)
            return self._scan(category_mask=PAGE_IS_PFNZERO, inverted=PAGE_IS_PFNZERO,  # PFNZERO clear
                              anyof=PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
        if classic:  # cannot tell zero-page mappings apart: they count as present
            present = self._classic(pagemap.PRESENT)
            swapped_written = self._classic(pagemap.SWAPPED_WRITTEN)
            swapped_protected = self._classic(pagemap.SWAPPED_PROTECTED)
        else:
            present = self._scan(category_mask=PAGE_IS_PRESENT | PAGE_IS_PFNZERO, inverted=PAGE_IS_PFNZERO)
            both = PAGE_IS_SWAPPED | PAGE_IS_WRITTEN
            swapped_written = self._scan(category_mask=both)
            swapped_protected = self._scan(category_mask=both, inverted=PAGE_IS_WRITTEN)
        held_data = intersect(swapped_protected, self._data_at_arm, self.page_size)
        return union(union(present, swapped_written, self.page_size), held_data, self.page_size)

    def _scan(self, **masks) -> list[Run]:
        # return_mask 0: uniform categories, so the kernel merges neighbours into one region
        return self._scanner.scan(self.regions, flags=self.populated_flags, return_mask=0, **masks)

    def _classic(self, select: bytes) -> list[Run]:
        return pagemap.flagged_runs(self.pagemap_fd, self.regions, page_size=self.page_size, select=select)

    def _arm(self) -> None:
        raise NotImplementedError

    def _collect(self, within: tuple[Region, ...] | None) -> tuple[list[Run], int]:
        """The written runs and their page count (``within``: see ``DirtyTracker``)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free what the subclass owns (threads, protections); the fds are closed afterwards."""

    @contextlib.contextmanager
    def _operation(self, what: str) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise TrackerError(f"{self.name} tracker of process {self.pid} is closed ({what})")
            try:
                yield
            except OSError as exc:
                raise TrackerError(f"{self.name} {what} of process {self.pid} failed: {exc}") from exc


def intersect(a: list[Run], b: list[Run], page_size: int) -> list[Run]:
    """Pages in both sorted, coalesced run lists (two-pointer walk, per run)."""
    out: list[Run] = []
    i = j = 0
    while i < len(a) and j < len(b):
        a_start, a_end = a[i][0], a[i][0] + a[i][1] * page_size
        b_start, b_end = b[j][0], b[j][0] + b[j][1] * page_size
        start, end = max(a_start, b_start), min(a_end, b_end)
        if start < end:
            out.append((start, (end - start) // page_size))
        if a_end <= b_end:
            i += 1
        else:
            j += 1
    return out
