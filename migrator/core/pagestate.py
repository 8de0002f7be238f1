"""One state byte per page of a layout: post-copy's bookkeeping of which pages are where.

The source keeps "still to send" (1) against "sent" (0) and the destination "current" (0),
"missing" (1) and "requested" (2). A switch-over marks runs of 100k scattered pages and each
fault claims a small window around its page, so the per-page work is in C
(``migrator.native.pages``: ``runs_set``, ``runs_claim``, and ``uffd_install`` which
``migrator.destination.faults`` calls on this table).

Runs are ``(address, count)`` of the layout, pages indexed across its regions as
``migrator.core.digest`` indexes its table. Every run is checked before anything changes: a run
outside the layout (unaligned, past a region, overflowing) is ``OSError(EFAULT)`` naming it, and
the table is left as it was. Runs of no pages are accepted and change nothing.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Sequence
from itertools import chain

from ..native.pages import ffi, lib
from .digest import region_table
from .model import MemoryLayout, Run
from .runs import Runs


class PageStates:
    """The table (a ``bytearray``, every page 0 at first) and the operations over runs of it.
    The C calls release the GIL and change each state byte atomically, so claims and installs
    may run at once from several threads; ``count`` is then a snapshot."""

    def __init__(self, layout: MemoryLayout) -> None:
        self.layout = layout
        self.page_size = layout.page_size
        self.table = bytearray(layout.total_pages)
        self._pointer = ffi.from_buffer("uint8_t[]", self.table)   # the table never changes size
        self._regions = region_table(layout)
        firsts, first = [], 0
        for region in layout.regions:
            firsts.append(first)
            first += region.length // layout.page_size
        self._firsts = firsts

    def c_arguments(self) -> tuple:
        """(state, nstate, regions, nregions, page_size): how the C functions take this table."""
        return self._pointer, len(self.table), self._regions, len(self.layout.regions), self.page_size

    def checked_pairs(self, runs: Sequence[Run]) -> array:
        """``runs`` as native (address, count) pairs, every one inside the layout; EFAULT names
        the first that is not."""
        pairs = _pairs(runs)
        bad = lib.runs_outside(self._regions, len(self.layout.regions), self.page_size, len(self.table),
                               ffi.from_buffer("uint64_t[]", pairs), len(runs))
        if bad != len(runs):
            raise _outside(runs[bad])
        return pairs

    def set(self, runs: Sequence[Run], value: int) -> int:
        """Every page of ``runs`` gets ``value``; returns how many pages changed state."""
        _check_value(value)
        pairs = _pairs(runs)
        changed = lib.runs_set(*self.c_arguments(), ffi.from_buffer("uint64_t[]", pairs), len(runs), value)
        if changed == lib.RUNS_OUTSIDE:
            self.checked_pairs(runs)          # names the run
        return changed

    def claim(self, runs: Sequence[Run], frm: int, to: int) -> list[Run]:
        """The pages of ``runs`` in state ``frm`` move to ``to``; returns them as coalesced
        runs, in the order the runs visit them."""
        _check_value(frm)
        _check_value(to)
        if frm == to:
            raise ValueError(f"claim: from and to are the same state ({frm})")
        pairs = self.checked_pairs(runs)
        room = max(1, min(sum(pairs[1::2]), len(self.table)))   # a page is claimed once: never more pairs
        out = array("Q", bytes(16 * room))
        n = lib.runs_claim(*self.c_arguments(), ffi.from_buffer("uint64_t[]", pairs), len(runs), frm, to,
                           ffi.from_buffer("uint64_t[]", out), room)
        if n in (lib.RUNS_OUTSIDE, lib.RUNS_NO_ROOM):   # checked above, sized above: a bug if seen
            raise AssertionError(f"runs_claim refused runs it was given checked ({n:#x})")
        return list(zip(out[0 : 2 * n : 2], out[1 : 2 * n : 2]))

    def count(self, value: int) -> int:
        return self.table.count(bytes([value]))

    def value_at(self, address: int) -> int:
        """The state of the page holding ``address`` (EFAULT outside the layout)."""
        for region, first in zip(self.layout.regions, self._firsts):
            if region.start <= address < region.end:
                return self.table[first + (address - region.start) // self.page_size]
        raise OSError(errno.EFAULT, f"address {address:#x} lies outside the layout")


def page_index_pairs(layout: MemoryLayout, runs: Sequence[Run]) -> bytes:
    """``runs`` of ``layout`` as native 64-bit (page index, count) pairs, pages counted across
    its regions (``MemoryLayout.page_indices``, in one native pass); EFAULT names a run outside."""
    pairs = _pairs(runs)
    out = array("Q", bytes(len(pairs) * 8))
    done = lib.runs_index(region_table(layout), len(layout.regions), layout.page_size, layout.total_pages,
                          ffi.from_buffer("uint64_t[]", pairs), len(runs), ffi.from_buffer("uint64_t[]", out))
    if done != len(runs):
        raise _outside(runs[done])
    return out.tobytes()


def _pairs(runs: Sequence[Run]) -> array:
    """Runs as native (address, count) pairs; EFAULT names one that is not two 64-bit integers."""
    if type(runs) is Runs:
        return runs.packed
    try:
        pairs = array("Q", chain.from_iterable(runs))
    except (OverflowError, TypeError):        # negative, past 64 bits, not an integer
        pairs = None
    if pairs is None or len(pairs) != 2 * len(runs):
        raise _outside(next((run for run in runs if not _fits_u64(run)), runs[0] if runs else None))
    return pairs


def _fits_u64(run) -> bool:
    try:
        address, count = run
    except (TypeError, ValueError):
        return False
    return all(type(v) is int and 0 <= v < 1 << 64 for v in (address, count))


def _outside(run) -> OSError:
    if isinstance(run, tuple) and len(run) == 2 and all(type(v) is int for v in run):
        return OSError(errno.EFAULT, f"pages {run[0]:#x}+{run[1]} lie outside the layout")
    return OSError(errno.EFAULT, f"run {run!r} is not an (address, count) pair of the layout")


def _check_value(value: int) -> None:
    if type(value) is not int or not 0 <= value <= 255:
        raise ValueError(f"a page state is a byte, not {value!r}")
