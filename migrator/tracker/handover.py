"""The tracked process's side: create its userfaultfd, register its memory, hand the fd over.

A userfaultfd acts on the memory of the process that *created* it, whoever holds the fd later.
So the guest creates and registers it itself, then passes it to the migrator over a unix socket
(SCM_RIGHTS); a migrator with ptrace rights may instead take it with ``pidfd_getfd``.
Registration lasts until the last reference to the fd is closed or the range is unregistered.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Literal

from ..core.errors import TrackerUnavailable
from ..core.model import Region
from . import _sys
from .maps import check_regions, normalize_regions
from ._uapi import (
    UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_UNPOPULATED,
    UFFD_USER_MODE_ONLY,
    UFFDIO_REGISTER_MODE_WP,
)

UffdMode = Literal["async", "sync"]

# async: writes resolve in the kernel (the tracker only scans); unpopulated pages get markers too.
# sync: every first write after protection stops the writer until a resolver thread unprotects.
MODE_FEATURES: dict[str, int] = {
    "async": UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
    "sync": UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED,
}


def create_uffd(mode: UffdMode) -> int:
    """A non-blocking, close-on-exec userfaultfd for this process with ``mode``'s features.

    Raises TrackerUnavailable naming what is missing (no userfaultfd access, or a kernel that
    does not offer WP_ASYNC).
    """
    flags = os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY
    try:
        fd, _how = _sys.userfaultfd(flags)
    except OSError as exc:
        raise TrackerUnavailable(
            f"cannot create a userfaultfd ({exc.strerror}): needs Linux with CONFIG_USERFAULTFD and "
            "either vm.unprivileged_userfaultfd=1, CAP_SYS_PTRACE, or read-write access to /dev/userfaultfd"
        ) from exc
    wanted = MODE_FEATURES[mode]
    try:
        granted, _ioctls = _sys.uffdio_api(fd, wanted)
    except OSError as exc:
        os.close(fd)
        missing = "WP_ASYNC (Linux 6.7+)" if mode == "async" else "write-protect faults"
        raise TrackerUnavailable(f"the kernel refused userfaultfd features {missing}: {exc.strerror}") from exc
    if granted & wanted != wanted:
        os.close(fd)
        raise TrackerUnavailable(f"the kernel lacks userfaultfd features {wanted & ~granted:#x}")
    return fd


def register_for_tracking(regions: Iterable[Region], mode: UffdMode = "async") -> int:
    """Create a uffd in *this* process and register ``regions`` for write-protect tracking.

    Returns the fd, to be handed to the migrator (``send_fds``). Raises TrackerUnavailable for a
    hugetlb mapping (WP_ASYNC cannot track it; the message names the mapping) or a kernel/user
    without the feature, TrackerError for a region that is unaligned or not mapped.
    """
    regions = normalize_regions(regions, mmap.PAGESIZE)
    check_regions("self", regions, refuse_hugetlb=True)
    fd = create_uffd(mode)
    try:
        for region in regions:
            _sys.uffdio_register(fd, region.start, region.length, UFFDIO_REGISTER_MODE_WP)
    except OSError:
        os.close(fd)
        raise
    return fd


def release_tracking(fd: int, regions: Iterable[Region]) -> None:
    """Undo ``register_for_tracking``: unprotect (waking any blocked writer) and unregister.

    A guest calls this when its migrator vanishes while it used synchronous write-protect, so that
    no thread stays blocked on a protected page. Safe to call more than once.
    """
    for region in regions:
        try:
            _sys.uffdio_writeprotect(fd, region.start, region.length, protect=False)
        except OSError:
            pass  # async mode refuses unprotect (EINVAL); an unregistered range has nothing to wake
        try:
            _sys.uffdio_unregister(fd, region.start, region.length)
        except OSError:
            pass  # already unregistered, or the range is gone


# --- SCM_RIGHTS ---------------------------------------------------------------------------------


def send_fds(sock: socket.socket, payload: bytes, fds: Sequence[int]) -> None:
    """Send ``payload`` with ``fds`` attached (one sendmsg)."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([payload], ancillary)


def recv_fds(sock: socket.socket, bufsize: int, max_fds: int) -> tuple[bytes, list[int]]:
    """Receive up to ``bufsize`` bytes and up to ``max_fds`` descriptors (close-on-exec)."""
    data, ancdata, _flags, _addr = sock.recvmsg(
        bufsize, socket.CMSG_SPACE(max_fds * array.array("i").itemsize), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", blob[: len(blob) - len(blob) % 4]))
    return data, fds


def take_fd(pid: int, target_fd: int) -> int:
    """Duplicate fd ``target_fd`` of process ``pid`` (pidfd_getfd; needs ptrace rights over it)."""
    pidfd = _sys.pidfd_open(pid)
    try:
        return _sys.pidfd_getfd(pidfd, target_fd)
    finally:
        os.close(pidfd)
