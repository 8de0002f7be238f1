"""Post-copy's stale-page table at the source (migrator.source.postcopy.StalePages): which
spans still need scanning before the switch. Pure: no kernel, no process."""

from __future__ import annotations

from migrator.core.model import MemoryLayout, Region
from migrator.source.postcopy import StalePages

P = 4096
A, B = 0x10000000, 0x30000000


def test_unsent_spans_cover_per_region_the_pages_not_stale_yet():
    stale = StalePages(MemoryLayout(pid=1, page_size=P, regions=(Region(A, 64 * P), Region(B, 32 * P))))
    assert stale.unsent_spans() == (Region(A, 64 * P), Region(B, 32 * P))    # nothing stale yet
    stale.mark([(A, 64), (B, 32)])
    assert stale.unsent_spans() == ()                                         # all stale: nothing to scan
    stale.states.set([(A + 5 * P, 1), (A + 20 * P, 2), (B + 31 * P, 1)], 0)   # three runs sent again
    assert stale.unsent_spans() == (Region(A + 5 * P, 17 * P), Region(B + 31 * P, P))
    assert stale.mark([(A + 5 * P, 17)]) == [(A + 5 * P, 1), (A + 20 * P, 2)]   # only the unstale ones
    assert stale.unsent_spans() == (Region(B + 31 * P, P),)
