"""Pages received straight into the restore guest's memory.

A restore guest on a memfd is mapped here too, so a raw Pages frame's payload can be received
into the pages' own places (``Channel.place_pages``): the receive is the only copy, where
a buffer took the frame and a second copy wrote it into the guest. The page digests still need
every page's hash: the apply step computes them from the mapping.

Placing is safe in pre-copy: a restore guest does not run until the commit, every round is
applied before the source scans for the next, and a session that fails (a frame whose tags do
not match, among the rest) kills the guest its bytes landed in. Post-copy restores into a
private guest, so nothing is placed into a running one.
"""

from __future__ import annotations

from ..core.digest import hash_pages_into, new_hashes
from ..protocol import IncomingPages

PLACE_MAX_RUNS = 64   # more runs in a frame: its views cost more in Python than the copy they spare


class Placement:
    """Where one frame's payload lands (``views``); ``hash`` fills its pages' hashes after, on
    a worker thread: hashing as the bytes land would hold up the link's reader, which the whole
    round waits for (tried: it slowed round 0 down)."""

    __slots__ = ("views", "hashes", "_page_size")

    def __init__(self, views: list[memoryview], page_size: int) -> None:
        self.views = views
        self._page_size = page_size
        self.hashes = new_hashes(sum(view.nbytes for view in views) // page_size)

    def hash(self) -> None:
        """Worker thread, once the frame is in: every page's hash, one native pass per view."""
        ps, hashes, done = self._page_size, memoryview(self.hashes), 0
        for view in self.views:
            n = view.nbytes // ps
            hash_pages_into(view, n, ps, hashes[done : done + n])
            done += n
        self.views = []          # let go of the mapping (it can be closed)


def placer(memory, page_size: int):
    """The ``Channel.place_pages`` placer for a restore guest whose memory is ``memory`` (a
    writable ``MemfdMemory`` taking the source's addresses)."""

    def place(incoming: IncomingPages) -> Placement | None:
        if len(incoming.runs) > PLACE_MAX_RUNS:
            return None
        return Placement(memory.views_of(incoming.runs), page_size)

    return place
