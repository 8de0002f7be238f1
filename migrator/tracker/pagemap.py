"""The classic /proc/PID/pagemap read (8 bytes per page): for kernels without PAGEMAP_SCAN.

Soft-dirty tracking reads its bits here, and trackers fall back to it for ``populated()`` where
PAGEMAP_SCAN (Linux 6.7+) is missing. It is ~10x slower than PAGEMAP_SCAN (8 GiB: ~37 ms) and
cannot tell pages mapped to the shared zero page from others without CAP_SYS_ADMIN, so such pages
are reported as populated.

No per-page Python: the flag bytes of all entries are picked with one strided slice, mapped to
0/1 with ``bytes.translate``, and runs of 1s found with a regular expression.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable

from ..core.model import Region, Run
from ._uapi import PM_ENTRY_PRESENT, PM_ENTRY_SOFT_DIRTY, PM_ENTRY_SWAPPED, PM_ENTRY_UFFD_WP

ENTRY_BYTES = 8
CHUNK_PAGES = 1 << 16  # 512 KiB of entries per read

# Entries are little-endian u64: byte 7 holds bits 56-63 (present 63, swapped 62, uffd-wp 57),
# byte 6 holds bits 48-55 (soft-dirty 55). A selection is a 256-byte table mapping byte 7 to 0/1.
_PRESENT = PM_ENTRY_PRESENT >> 56
_SWAPPED = PM_ENTRY_SWAPPED >> 56
_UFFD_WP = PM_ENTRY_UFFD_WP >> 56
_SOFT_DIRTY = PM_ENTRY_SOFT_DIRTY >> 48


def _table(select) -> bytes:
    return bytes(1 if select(b) else 0 for b in range(256))


POPULATED = _table(lambda b: b & (_PRESENT | _SWAPPED))
PRESENT = _table(lambda b: b & _PRESENT)
SWAPPED_WRITTEN = _table(lambda b: b & _SWAPPED and not b & _UFFD_WP)
SWAPPED_PROTECTED = _table(lambda b: b & _SWAPPED and b & _UFFD_WP)
_TO_SOFT_DIRTY = _table(lambda b: b & _SOFT_DIRTY)
_ONES = re.compile(rb"\x01+")


def flagged_runs(pagemap_fd: int, regions: Iterable[Region], *, page_size: int, select: bytes = POPULATED,
                 soft_dirty: bool = False) -> list[Run]:
    """Runs of pages whose entry matches ``select`` (a table above); with ``soft_dirty`` only the
    soft-dirty ones among them."""
    runs: list[Run] = []
    for region in regions:
        first_page = region.start // page_size
        for offset in range(0, region.length // page_size, CHUNK_PAGES):
            count = min(CHUNK_PAGES, region.length // page_size - offset)
            entries = _read_entries(pagemap_fd, first_page + offset, count)
            flags = entries[7::ENTRY_BYTES].translate(select)
            if soft_dirty:
                dirty = entries[6::ENTRY_BYTES].translate(_TO_SOFT_DIRTY)
                both = int.from_bytes(flags, "little") & int.from_bytes(dirty, "little")
                flags = both.to_bytes(count, "little")
            base = region.start + offset * page_size
            for match in _ONES.finditer(flags):
                address = base + match.start() * page_size
                pages = match.end() - match.start()
                if runs and runs[-1][0] + runs[-1][1] * page_size == address:
                    runs[-1] = (runs[-1][0], runs[-1][1] + pages)
                else:
                    runs.append((address, pages))
    return runs


def _read_entries(pagemap_fd: int, first_page: int, count: int) -> bytes:
    want = count * ENTRY_BYTES
    data = os.pread(pagemap_fd, want, first_page * ENTRY_BYTES)
    if len(data) != want:
        raise OSError(errno.EIO, f"short read of /proc/PID/pagemap at page {first_page:#x}: {len(data)} of {want} bytes")
    return data
