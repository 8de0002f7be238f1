"""Dirty-page trackers: which pages of a process were written since the last look.

Synchronous and thread-based only (never trio): the engines call these from worker threads.

A userfaultfd acts on the memory of the process that *created* it, so the tracked process (the
guest) creates and registers its own uffd (``handover.register_for_tracking``) and hands it over
(SCM_RIGHTS, or ``pidfd_getfd``); ``open_tracker`` takes ownership of it. Every tracker also needs
ptrace read rights over the guest to open ``/proc/PID/pagemap`` (same user and a parent, or
PR_SET_PTRACER, or kernel.yama.ptrace_scope=0, or CAP_SYS_PTRACE).

Kinds (what the guest registers; what the kernel needs):

- ``wp-async``: uffd WP_ASYNC + PAGEMAP_SCAN, the default (``register_for_tracking(r, "async")``;
  Linux 6.7+).
- ``sync-wp``: uffd write-protect + a resolver thread, the baseline and the fallback
  (``register_for_tracking(r, "sync")``; Linux 5.7+).
- ``soft-dirty``: clear_refs 4 + pagemap bit 55 with the guest frozen around each collect (no uffd;
  CONFIG_MEM_SOFT_DIRTY).
- ``full``: every populated page every round, the baseline (no uffd; any kernel).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence
from typing import Literal, Protocol

from ..core.errors import TrackerError, TrackerUnavailable
from ..core.model import Region, Run
from ._uapi import MADV_POPULATE_WRITE
from .base import TrackerBase, TrackerStats
from .features import soft_dirty_missing, sync_wp_missing, wp_async_missing
from .full import FullTracker
from .maps import check_regions, normalize_regions
from .soft_dirty import SoftDirtyTracker
from .sync_wp import SyncWpTracker
from .wp_async import WpAsyncTracker

__all__ = [
    "MADV_POPULATE_WRITE",
    "TRACKERS",
    "DirtyTracker",
    "TrackerStats",
    "choose_tracker",
    "open_tracker",
    "required_uffd_mode",
]

TRACKERS = ("wp-async", "sync-wp", "soft-dirty", "full")

_CLASSES: dict[str, type[TrackerBase]] = {
    "wp-async": WpAsyncTracker,
    "sync-wp": SyncWpTracker,
    "soft-dirty": SoftDirtyTracker,
    "full": FullTracker,
}
_UFFD_MODES: dict[str, Literal["async", "sync"]] = {"wp-async": "async", "sync-wp": "sync"}


class DirtyTracker(Protocol):
    """What the engines code against. All calls are synchronous; safe from a worker thread.

    ``collect`` returns the pages written since ``arm`` or the previous ``collect`` as sorted,
    coalesced ``(address, page_count)`` runs (no page twice, none missed) and re-protects them in
    the same walk: read the page contents *after* it returns. ``collect(within)`` wants only the
    writes inside ``within`` (ranges of the regions, [] for none): a tracker may walk only there
    (wp-async does; the others walk everything) and report pages outside too. ``populated`` lists pages holding
    data (present or swapped, not never-touched, not mapped to the shared zero page) without
    changing protection; round 0 sends those. ``close`` is idempotent and releases fds and
    threads (sync-wp first unprotects everything so the guest never stays blocked).
    """

    name: str

    def arm(self) -> None: ...
    def collect(self, within: tuple[Region, ...] | None = None) -> list[Run]: ...
    def populated(self) -> list[Run]: ...
    def close(self) -> None: ...
    def statistics(self) -> TrackerStats: ...
    def __enter__(self) -> DirtyTracker: ...
    def __exit__(self, *exc: object) -> None: ...


def required_uffd_mode(kind: str) -> Literal["async", "sync"] | None:
    """The uffd mode the guest must register for ``kind`` (None: no uffd needed)."""
    _tracker_class(kind)
    return _UFFD_MODES.get(kind)


def open_tracker(kind: str, *, pid: int, regions: Sequence[Region], uffd: int | None,
                 page_size: int = 4096) -> DirtyTracker:
    """Open a ``kind`` tracker over ``regions`` of process ``pid``. Takes ownership of ``uffd``.

    ``uffd`` must be the one ``pid`` registered (``required_uffd_mode(kind)`` says how); the kernel
    offers no way to check which process created a uffd, only that the regions are registered in
    the right mode. ``full`` and ``soft-dirty`` need none (a uffd given anyway is closed).

    Raises TrackerUnavailable naming what is missing (kernel feature, ptrace rights over ``pid``,
    the guest's uffd registered in the wrong mode, a hugetlb mapping) and TrackerError for bad
    input (unknown kind, unaligned or unmapped region, an fd that is not a userfaultfd).
    """
    try:
        cls = _tracker_class(kind)
        if page_size != mmap.PAGESIZE:
            raise TrackerError(f"page size {page_size} is not this machine's ({mmap.PAGESIZE})")
        regions = normalize_regions(regions, page_size)
        reason = cls.kernel_missing()
        if reason:
            raise TrackerUnavailable(f"{kind} tracker: {reason}")
        mode = _UFFD_MODES.get(kind)
        if mode is None and uffd is not None:
            os.close(uffd)  # ours now, and not needed
            uffd = None
        if mode is not None:
            _check_is_userfaultfd(kind, mode, uffd)
        pagemap_fd = _open_pagemap(pid)
    except BaseException:
        if uffd is not None:
            os.close(uffd)
        raise
    tracker = cls(pid=pid, regions=regions, page_size=page_size, pagemap_fd=pagemap_fd, uffd=uffd)
    try:
        try:
            check_regions(pid, regions, refuse_hugetlb=mode is not None)
        except OSError as exc:
            raise TrackerError(f"cannot read the mappings of process {pid}: {exc}") from exc
        tracker.check_mode()
        tracker.start()
    except BaseException:
        tracker.close()
        raise
    return tracker


def choose_tracker() -> str:
    """The best tracker this machine offers (what ``migrator probe`` recommends)."""
    if wp_async_missing() is None:
        return "wp-async"
    if sync_wp_missing() is None:
        return "sync-wp"
    if soft_dirty_missing() is None:
        return "soft-dirty"
    return "full"


def _tracker_class(kind: str) -> type[TrackerBase]:
    try:
        return _CLASSES[kind]
    except KeyError:
        raise TrackerError(f"unknown tracker {kind!r}; choose one of {', '.join(TRACKERS)}") from None


def _check_is_userfaultfd(kind: str, mode: str, uffd: int | None) -> None:
    if uffd is None:
        raise TrackerError(
            f"{kind} needs the guest's userfaultfd, registered with register_for_tracking(regions, {mode!r})"
        )
    try:
        target = os.readlink(f"/proc/self/fd/{uffd}")
    except OSError as exc:
        raise TrackerError(f"{kind}: uffd {uffd} is not an open file descriptor ({exc.strerror})") from exc
    if target != "anon_inode:[userfaultfd]":
        raise TrackerError(f"{kind}: fd {uffd} is not a userfaultfd (it is {target})")


def _open_pagemap(pid: int) -> int:
    path = f"/proc/{pid}/pagemap"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise TrackerUnavailable(f"process {pid} does not exist (no {path})") from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise TrackerUnavailable(
                f"no ptrace read rights over process {pid} (open {path}: {exc.strerror}): track a descendant "
                "of the same user, or a process that called prctl(PR_SET_PTRACER, <migrator pid>), or set "
                "kernel.yama.ptrace_scope=0 for same-user processes, or run with CAP_SYS_PTRACE"
            ) from exc
        raise TrackerUnavailable(f"cannot open {path}: {exc.strerror}") from exc
