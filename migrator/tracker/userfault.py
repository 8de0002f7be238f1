"""Post-copy's registrations of a restore guest's uffd: MISSING on top of its WP, and back.

The guest created its uffd (WP_ASYNC | WP_UNPOPULATED) and registered its region MODE_WP; the
destination holds a copy. Registering the same range again with MODE_MISSING | MODE_WP adds
MISSING: a touch of an absent page then waits for an install. Registering with fewer modes is
silently skipped by the kernel (the area already has a superset), so dropping MISSING takes an
UNREGISTER then a MODE_WP REGISTER, which clears the uffd-wp bits: a later PAGEMAP_SCAN reads
every page as written once, as after the guest's own registration.

The guest's uffd is ``UFFD_USER_MODE_ONLY``: only the guest's own user-mode touches wait for an
absent page; a kernel access (process_vm_readv/writev, a syscall's buffer) fails with EFAULT.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..core.errors import TrackerUnavailable
from ..core.model import Region
from . import _sys
from ._uapi import (
    UFFD_EVENT_PAGEFAULT,
    UFFD_MSG_SIZE,
    UFFD_PAGEFAULT_FLAG_WP,
    UFFD_PAGEFAULT_FLAG_WRITE,
    UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_REGISTER_MODE_WP,
)

__all__ = [
    "MSG_SIZE",
    "EVENT_PAGEFAULT",
    "PAGEFAULT_FLAG_WRITE",
    "PAGEFAULT_FLAG_WP",
    "register_missing",
    "register_wp_only",
]

MSG_SIZE = UFFD_MSG_SIZE
EVENT_PAGEFAULT = UFFD_EVENT_PAGEFAULT
PAGEFAULT_FLAG_WRITE = UFFD_PAGEFAULT_FLAG_WRITE
PAGEFAULT_FLAG_WP = UFFD_PAGEFAULT_FLAG_WP

# bits of the ioctls UFFDIO_REGISTER says the range allows (_UFFDIO_COPY, _UFFDIO_ZEROPAGE)
_INSTALL_IOCTLS = (1 << 0x03) | (1 << 0x04)


def register_missing(uffd: int, regions: Iterable[Region]) -> None:
    """Add MISSING to the WP registration of every region (again: the same modes are a no-op).
    TrackerUnavailable names the missing kernel feature when the kernel refuses it."""
    for region in regions:
        try:
            ioctls = _sys.uffdio_register(uffd, region.start, region.length,
                                          UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP)
        except OSError as exc:
            raise TrackerUnavailable(f"userfaultfd MISSING mode on top of WP refused for "
                                     f"[{region.start:#x}, +{region.length:#x}): {exc.strerror}") from exc
        if ioctls & _INSTALL_IOCTLS != _INSTALL_IOCTLS:
            raise TrackerUnavailable(f"userfaultfd MISSING mode: [{region.start:#x}, +{region.length:#x}) "
                                     f"does not allow UFFDIO_COPY and UFFDIO_ZEROPAGE (ioctls {ioctls:#x})")


def register_wp_only(uffd: int, regions: Iterable[Region]) -> None:
    """Drop MISSING: unregister, then register MODE_WP alone (WP_ASYNC tracking as before)."""
    for region in regions:
        _sys.uffdio_unregister(uffd, region.start, region.length)
        _sys.uffdio_register(uffd, region.start, region.length, UFFDIO_REGISTER_MODE_WP)
