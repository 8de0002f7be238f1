"""Pages received straight into the restore guest's memory.

A restore guest on a memfd is mapped here too, so a raw Pages frame's payload can be received
into the pages' own places (``Channel.place_pages``): the receive is the only copy, where
a buffer took the frame and a second copy wrote it into the guest. The page digests still need
every page's hash: the apply step computes them from the mapping.

Placing is safe in pre-copy: a restore guest does not run until the commit, every round is
applied before the source scans for the next, and a session that fails (a frame whose tags do
not match, among the rest) kills the guest its bytes landed in. Post-copy restores into a
private guest, so nothing is placed into a running one.

On a plain socket whose payloads carry no tag the whole payload is received by C instead
(``RunsPlacement``: ``recv_runs`` over the runs' places, and ``hash_runs`` after): a scattered
batch, a run per page, then lands in place too, where a view per run in Python cost more than
the copy it spared. Elsewhere (TLS decrypts into views; tagged payloads are hashed from views)
frames of at most PLACE_MAX_RUNS runs are placed through views, the rest go through a buffer.
"""

from __future__ import annotations

import errno
import os

from ..core.digest import hash_pages_into, new_hashes
from ..core.runs import count_pages, words
from ..native.pages import ffi, lib
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

    @property
    def payload(self) -> list[memoryview]:
        """What ``place_frame`` takes: the views."""
        return self.views

    def hash(self) -> None:
        """Worker thread, once the frame is in: every page's hash, one native pass per view."""
        ps, hashes, done = self._page_size, memoryview(self.hashes), 0
        for view in self.views:
            n = view.nbytes // ps
            hash_pages_into(view, n, ps, hashes[done : done + n])
            done += n
        self.views = []          # let go of the mapping (it can be closed)


class RunsPlacement:
    """One frame's payload received by C into its runs' places (a protocol ``Target``); its
    pages hashed there after, on a worker thread. ``payload`` is what ``place_frame`` takes."""

    __slots__ = ("nbytes", "hashes", "payload", "_memory", "_args", "_nruns")

    def __init__(self, memory, runs, page_size: int) -> None:
        self._memory = memory                 # keeps the mapping open while the frame lands
        pairs = words(runs)                   # kept alive by the cdata made from it
        self._nruns = len(pairs) // 2
        base, regions, nregions = memory.native_writer()
        self._args = (base, regions, nregions, ffi.from_buffer("uint64_t[]", pairs), self._nruns, page_size)
        self.nbytes = count_pages(runs) * page_size
        self.hashes = new_hashes(self.nbytes // page_size)
        self.payload = (self,)

    def receive(self, fd: int, offset: int) -> int | None:
        """One non-blocking receive of the payload from byte ``offset`` on: bytes received (0 at
        the peer's end), or None when nothing is there yet. OSError with the kernel's errno."""
        n = lib.recv_runs(fd, *self._args, offset, self.nbytes - offset)
        if n >= 0:
            return n
        if -n in (errno.EAGAIN, errno.EINTR):
            return None
        raise self._error(n)

    def copy_in(self, offset: int, data: memoryview) -> None:
        n = lib.place_runs(*self._args, offset, ffi.from_buffer(data), data.nbytes)
        if n < 0:
            raise self._error(n)

    def hash(self) -> None:
        """Worker thread, once the frame is in: every page's hash, from the mapping."""
        if lib.hash_runs(*self._args, ffi.from_buffer("uint64_t[]", self.hashes)) != self._nruns:
            raise self._error(lib.RECV_RUNS_REFUSED)
        self._args = self._memory = None      # let go of the mapping (it can be closed)

    @staticmethod
    def _error(n: int) -> OSError:
        if n == lib.RECV_RUNS_REFUSED:
            return OSError(errno.EFAULT, "memfd: a placed run is outside the guest's regions")
        return OSError(-n, os.strerror(-n))


def placer(memory, page_size: int):
    """The ``Channel.place_pages`` placer for a restore guest whose memory is ``memory`` (a
    writable ``MemfdMemory`` taking the source's addresses). ``native``: the link can take a
    ``RunsPlacement`` (a plain socket, payloads without tags)."""

    def place(incoming: IncomingPages, native: bool = False) -> Placement | RunsPlacement | None:
        if native:
            return RunsPlacement(memory, incoming.runs, page_size)
        if len(incoming.runs) > PLACE_MAX_RUNS:
            return None
        return Placement(memory.views_of(incoming.runs), page_size)

    return place
