"""What this kernel and this user can do, checked on scratch memory of the calling process.

Each check answers ``None`` when the feature works, or a one-line reason naming the missing kernel
feature or right. Nothing here ever writes to a write-protected page: WP_ASYNC is confirmed with
``PM_SCAN_CHECK_WPASYNC`` on a registered scratch mapping (EPERM when protection would be
synchronous), never by a write that could block. Results are cached per process.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import struct

from ..core.errors import TrackerUnavailable
from ..core.model import Region
from . import _sys
from .handover import register_for_tracking
from ._uapi import (
    FEATURE_NAMES,
    PAGE_IS_PRESENT,
    PM_ENTRY_PRESENT,
    PM_ENTRY_SOFT_DIRTY,
    PM_SCAN_CHECK_WPASYNC,
    UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_USER_MODE_ONLY,
    ffi,
)

PAGE_SIZE = mmap.PAGESIZE


class _ScratchPage:
    """One private anonymous page of this process, with its address (closed on exit)."""

    def __enter__(self) -> _ScratchPage:
        self.map = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.address = _sys.buffer_address(self.map)
        return self

    def __exit__(self, *exc) -> None:
        self.map.close()


@functools.cache
def userfaultfd_access() -> tuple[str | None, str | None]:
    """(how a userfaultfd was created: "syscall" or "/dev/userfaultfd", reason it could not be)."""
    try:
        fd, how = _sys.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
    except OSError as exc:
        return None, (
            f"userfaultfd unavailable ({exc.strerror}): needs CONFIG_USERFAULTFD and either "
            "vm.unprivileged_userfaultfd=1, CAP_SYS_PTRACE, or access to /dev/userfaultfd"
        )
    os.close(fd)
    return how, None


@functools.cache
def userfaultfd_features() -> int:
    """Feature bits the kernel offers (UFFDIO_API on a throw-away fd: it works once per fd)."""
    how, _reason = userfaultfd_access()
    if how is None:
        return 0
    fd, _ = _sys.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
    try:
        features, _ioctls = _sys.uffdio_api(fd, 0)
    finally:
        os.close(fd)
    return features


def feature_names(features: int) -> list[str]:
    """Names of the set bits of ``features`` (unnamed bits as ``bit N``)."""
    return [FEATURE_NAMES.get(1 << bit, f"bit {bit}") for bit in range(64) if features >> bit & 1]


@functools.cache
def pagemap_scan_missing() -> str | None:
    """None if PAGEMAP_SCAN works on /proc/self/pagemap, else why not."""
    with _ScratchPage() as page, open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        vec = ffi.new("struct page_region[]", 1)
        try:
            _sys.pagemap_scan(pagemap.fileno(), page.address, page.address + PAGE_SIZE, vec, 1,
                              flags=0, category_mask=0, return_mask=PAGE_IS_PRESENT)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                return "the kernel has no PAGEMAP_SCAN ioctl on /proc/PID/pagemap (needs Linux 6.7+)"
            return f"PAGEMAP_SCAN failed: {exc}"
    return None


@functools.cache
def wp_async_missing() -> str | None:
    """None if userfaultfd WP_ASYNC is in effect here, else why not.

    Registers a scratch page with an async uffd and asks PAGEMAP_SCAN with PM_SCAN_CHECK_WPASYNC,
    which fails with EPERM when the protection would be synchronous.
    """
    reason = pagemap_scan_missing()
    if reason:
        return f"WP_ASYNC cannot be checked or used: {reason}"
    with _ScratchPage() as page:
        page.map[0] = 1
        try:
            uffd = register_for_tracking([Region(page.address, PAGE_SIZE)], "async")
        except TrackerUnavailable as exc:
            return str(exc)
        try:
            with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
                _sys.pagemap_scan(pagemap.fileno(), page.address, page.address + PAGE_SIZE, ffi.NULL, 0,
                                  flags=PM_SCAN_CHECK_WPASYNC, return_mask=PAGE_IS_PRESENT)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                return "the kernel accepted WP_ASYNC but write-protection stays synchronous (PM_SCAN_CHECK_WPASYNC: EPERM)"
            return f"PAGEMAP_SCAN with PM_SCAN_CHECK_WPASYNC failed: {exc}"
        finally:
            os.close(uffd)
    return None


@functools.cache
def sync_wp_missing() -> str | None:
    """None if synchronous userfaultfd write-protect faults are available, else why not."""
    how, reason = userfaultfd_access()
    if how is None:
        return reason
    if not userfaultfd_features() & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
        return "the kernel's userfaultfd has no write-protect faults (UFFD_FEATURE_PAGEFAULT_FLAG_WP, Linux 5.7+)"
    return None


@functools.cache
def soft_dirty_missing() -> str | None:
    """None if the kernel tracks soft-dirty bits, else why not.

    On a kernel with CONFIG_MEM_SOFT_DIRTY a freshly written page has bit 55 set in
    /proc/self/pagemap; without it the bit always reads 0 (and ``clear_refs 4`` is accepted but
    does nothing, so writing it proves nothing).
    """
    with _ScratchPage() as page, open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        page.map[0] = 1
        (entry,) = struct.unpack("=Q", os.pread(pagemap.fileno(), 8, page.address // PAGE_SIZE * 8))
    if not entry & PM_ENTRY_PRESENT:
        return "cannot check soft-dirty: a freshly written page is not present in /proc/self/pagemap"
    if not entry & PM_ENTRY_SOFT_DIRTY:
        return (
            "kernel built without CONFIG_MEM_SOFT_DIRTY (a freshly written page has no soft-dirty bit 55 "
            "in /proc/self/pagemap)"
        )
    return None
