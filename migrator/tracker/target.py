"""Track the writes of a running process that knows nothing of migrator (``migrator track --pid``).

``attach(pid)`` injects a userfaultfd into the target (``inject``), asks the kernel for WP_ASYNC
on it and registers, mode WP only, every mapping that can be tracked: private writable anonymous
memory (heap, stacks, anonymous mmaps) and shmem/memfd mappings. WP_ASYNC resolves every write
fault inside the kernel, so no write of the target ever waits for the tracker, alive or dead;
MODE_MISSING is never asked for. The registrations live exactly as long as the tracker's copy of
the fd: ``close()``, an exception or a SIGKILL of the tracker ends them all at once.

What cannot be tracked is listed with the reason and size (``Untracked``), never skipped silently:
hugetlb mappings (WP_ASYNC refuses them), writable private file mappings (``.data`` of a binary or
library: file-backed, not registered) and shared mappings of regular files.

``collect()`` is one interval: re-read the layout (``/proc/PID/maps``, then smaps only when it
changed), register and arm new mappings, drop vanished ones, then one PAGEMAP_SCAN per tracked
mapping that reports the pages written since the last one and re-protects them in the same walk.
A mapping that appeared since the last interval reports its pages present (not the zero page) as
written: they were written after it appeared, before it could be armed.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import time
from dataclasses import dataclass

from ..core.errors import TrackerError, TrackerUnavailable
from ..core.model import Run
from ..core.runs import union
from . import _sys
from .features import pagemap_scan_missing, wp_async_missing
from .handover import MODE_FEATURES
from .inject import inject_userfaultfd, rights_refusal
from .maps import Mapping, read_mappings
from .scan import new_vec, scan_runs
from ._uapi import (
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    UFFDIO_REGISTER_MODE_WP,
    ffi,
)

TRACK_FLAGS = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
_SHMEM_PREFIXES = ("/memfd:", "/dev/shm/", "/SYSV", "/dev/zero", "[anon_shmem")


@dataclass(frozen=True, slots=True)
class TrackedMapping:
    start: int
    end: int
    path: str   # "" for anonymous memory


@dataclass(frozen=True, slots=True)
class Untracked:
    start: int
    end: int
    path: str
    reason: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Interval:
    """One collect: when it ended (seconds since attach), and the written runs of each mapping."""

    t: float
    seconds: float
    written: dict[TrackedMapping, list[Run]]
    layout_changed: bool

    @property
    def dirty_pages(self) -> int:
        return sum(pages for runs in self.written.values() for _, pages in runs)


def why_untracked(mapping: Mapping) -> str | None:
    """None when ``mapping`` is trackable, "" when it needs no tracking, else the reason."""
    if "w" not in mapping.perms:
        return ""   # read-only: not written (an mprotect makes it a new, writable mapping)
    if mapping.hugetlb:
        return "hugetlb: userfaultfd WP_ASYNC cannot register it"
    path = mapping.path
    if mapping.perms[3] == "s":
        if not path or path.startswith(_SHMEM_PREFIXES):
            return None
        return "shared mapping of a regular file: file-backed, not registered"
    if not path or path.startswith("[heap]") or path.startswith("[stack") or path.startswith("[anon:"):
        return None
    if path.startswith("["):
        return f"special mapping {path}: not registered"
    return "writable private file mapping (.data of a binary or library): file-backed, not registered"


def preflight(pid: int) -> None:
    """One line naming what is missing before anything touches the target."""
    if not os.path.isdir(f"/proc/{pid}"):
        raise TrackerError(f"no such process: {pid}")
    for missing in (pagemap_scan_missing(), wp_async_missing()):
        if missing:
            raise TrackerUnavailable(missing)


class TargetTracker:
    """The WP_ASYNC registrations over one running process; see the module docstring."""

    def __init__(self, pid: int, uffd: int, *, stopped_s: float, page_size: int = mmap.PAGESIZE) -> None:
        self.pid, self.uffd, self.page_size, self.stopped_s = pid, uffd, page_size, stopped_s
        self._page_shift = page_size.bit_length() - 1
        self.pidfd = _sys.pidfd_open(pid)
        try:
            self.pagemap_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            os.close(self.pidfd)
            raise rights_refusal(pid, "opening /proc/PID/pagemap") from None
        self._vec_len = 4096
        self._vec = new_vec(self._vec_len)
        self.mappings: list[TrackedMapping] = []
        self.untracked: dict[tuple[int, int], Untracked] = {}
        self._ours: set[tuple[int, int]] = set()
        self._maps_text = ""
        self._pending: dict[TrackedMapping, list[Run]] = {}
        self.started = time.monotonic()
        self._last = self.started
        self._needs_refresh = True

    # --- layout ------------------------------------------------------------------------------

    def _read_maps(self) -> str:
        with open(f"/proc/{self.pid}/maps") as maps:
            return maps.read()

    def refresh(self, *, initial: bool = False) -> bool:
        """Register mappings that appeared, drop vanished ones; True if the layout changed."""
        text = self._read_maps()
        if text == self._maps_text and not self._needs_refresh:
            return False
        self._maps_text, self._needs_refresh = text, False
        before = [(m.start, m.end) for m in self.mappings]
        tracked: list[TrackedMapping] = []
        ours: set[tuple[int, int]] = set()
        for mapping in read_mappings(self.pid):
            reason = why_untracked(mapping)
            key = (mapping.start, mapping.end)
            if reason == "":
                continue
            if reason is not None:
                self.untracked[key] = Untracked(mapping.start, mapping.end, mapping.path, reason)
                continue
            target = TrackedMapping(mapping.start, mapping.end, mapping.path)
            if "uw" in mapping.vmflags or "um" in mapping.vmflags:
                if not any(s < mapping.end and mapping.start < e for s, e in self._ours):
                    self.untracked[key] = Untracked(mapping.start, mapping.end, mapping.path,
                                                    "registered with the process's own userfaultfd")
                    continue
            elif not self._register(target, fresh=not initial and not any(s < mapping.end and mapping.start < e for s, e in before)):
                continue
            ours.add(key)
            tracked.append(target)
        self._ours, self.mappings = ours, tracked
        return True

    def _register(self, mapping: TrackedMapping, *, fresh: bool) -> bool:
        length = mapping.end - mapping.start
        try:
            _sys.uffdio_register(self.uffd, mapping.start, length, UFFDIO_REGISTER_MODE_WP)
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.ENOENT, errno.ESRCH):
                return False   # vanished between reading the layout and registering
            self.untracked[(mapping.start, mapping.end)] = Untracked(
                mapping.start, mapping.end, mapping.path, f"the kernel refused UFFDIO_REGISTER (WP): {exc.strerror}")
            return False
        if fresh:   # written since it appeared: present pages that are not the shared zero page
            runs: list[Run] = []
            self._scan(mapping, flags=0, category_mask=PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
                       inverted=PAGE_IS_PFNZERO, return_mask=PAGE_IS_PRESENT, runs=runs)
        self._scan(mapping, flags=PM_SCAN_WP_MATCHING, category_mask=PAGE_IS_WRITTEN,
                   return_mask=PAGE_IS_WRITTEN, runs=[], with_output=False)
        if fresh and runs:
            self._pending[mapping] = runs
        return True

    def _scan(self, mapping: TrackedMapping, *, runs: list[Run], with_output: bool = True, **masks) -> None:
        vec, vec_len = (self._vec, self._vec_len) if with_output else (ffi.NULL, 0)
        scan_runs(self.pagemap_fd, mapping.start, mapping.end, flags=masks.pop("flags"),
                  category_mask=masks.get("category_mask", 0), anyof=0, inverted=masks.get("inverted", 0),
                  return_mask=masks["return_mask"], vec=vec, vec_len=vec_len, page_size=self.page_size, runs=runs)

    # --- intervals ---------------------------------------------------------------------------

    def alive(self) -> bool:
        """False once the target has exited (its pidfd turns readable)."""
        return not select.select([self.pidfd], [], [], 0)[0]

    def collect(self) -> Interval:
        """One interval: the layout brought up to date, then one scan pass (see the module)."""
        try:
            changed = self.refresh()
        except FileNotFoundError:
            raise ProcessLookupError(errno.ESRCH, f"process {self.pid} exited") from None
        pending, self._pending = self._pending, {}
        written: dict[TrackedMapping, list[Run]] = {}
        for mapping in self.mappings:
            runs = written[mapping] = []
            try:
                self._scan(mapping, flags=TRACK_FLAGS, category_mask=PAGE_IS_WRITTEN,
                           return_mask=PAGE_IS_WRITTEN, runs=runs)
            except OSError as exc:
                if exc.errno != errno.EPERM:
                    raise
                self._needs_refresh = True   # replaced by an unregistered mapping meanwhile
            if mapping in pending:   # written before it was registered, and maybe again since
                written[mapping] = union(pending.pop(mapping), runs, self.page_size)
        written.update(pending)      # registered, written, and gone again before this scan
        now = time.monotonic()
        interval = Interval(t=now - self.started, seconds=now - self._last,
                            written={m: r for m, r in written.items() if r}, layout_changed=changed)
        self._last = now
        return interval

    def close(self) -> None:
        """End every registration (closing our fd is enough) and let go of the target."""
        for fd in (self.uffd, self.pagemap_fd, self.pidfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.uffd = self.pagemap_fd = self.pidfd = -1

    def __enter__(self) -> TargetTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach(pid: int) -> TargetTracker:
    """Start tracking ``pid``: inject the uffd, enable WP_ASYNC, register and arm its mappings."""
    preflight(pid)
    injected = inject_userfaultfd(pid)
    try:
        wanted = MODE_FEATURES["async"]
        try:
            granted, _ioctls = _sys.uffdio_api(injected.uffd, wanted)
        except OSError as exc:
            raise TrackerUnavailable(f"the kernel refused userfaultfd WP_ASYNC (Linux 6.7+): {exc.strerror}") from None
        if granted & wanted != wanted:
            raise TrackerUnavailable(f"the kernel lacks userfaultfd features {wanted & ~granted:#x} (WP_ASYNC)")
        tracker = TargetTracker(pid, injected.uffd, stopped_s=injected.stopped_s)
    except BaseException:
        os.close(injected.uffd)
        raise
    try:
        tracker.refresh(initial=True)
    except BaseException:
        tracker.close()
        raise
    return tracker
