"""The destination's native fault loop: a restore guest's faults asked for and answered without
Python (``fault_serve`` in ``migrator/native/postcopy.c``).

Used after the switch when the session's urgent link could be handed over
(``Channel.native_faults``): one worker thread reads the guest's uffd, claims each fault's
window in the page-state table that the push's installs share, writes the request records on
the link, and installs each answer with UFFDIO_COPY. Python reads its counts, fault latencies
and page hashes (``record_digests``) when it is done. The source's end record (after its last
answer, before its page digest) ends the link's part; the loop goes on zero-filling faults on
current pages until ``stop``.

A link that fails (the source or the link gone) ends the loop with ``failure`` set: the
receiver's Python fault path takes over (a resumed session's requests go as frames), and
``lacking`` asks again for every page requested here and never answered.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ..core.digest import PageDigests, region_table
from ..core.model import MemoryLayout
from ..core.nativeloop import NativeLoop, loop_failure, record_log, zeroed_words
from ..native.pages import ffi, lib
from .faults import MissingPages

LATENCIES = 1 << 16      # fault latencies kept (the first ones; the counts cover every fault)


@dataclass(frozen=True, slots=True)
class FaultLoopStats:
    faults: int                  # faulting pages the loop asked for
    requested_pages: int         # pages installed from answers that a request had claimed
    installed_pages: int         # pages installed from answers
    zero_filled: int             # faults on pages current here but absent: zero pages
    latencies_s: tuple[float, ...]   # fault read to page installed, the first LATENCIES faults


class NativeFaults:
    """The loop's state, buffers and socket (owned: ``close``)."""

    def __init__(self, missing: MissingPages, sock: int, src: MemoryLayout, window: int) -> None:
        self._loop = NativeLoop(sock)
        self.ended = trio.Event()          # the source's end record came (or the loop failed)
        self.failure: Exception | None = None
        state, nstate, regions, nregions, page_size = missing.states.c_arguments()
        self._src_regions = region_table(src)     # held while the loop reads it
        self._buf = ffi.new("uint8_t[]", lib.FAULT_MAX_PAGES * page_size)
        self._fault_ns, fault_map = zeroed_words(nstate)
        self._latency_ns, latency_map = zeroed_words(LATENCIES)
        self._log, log_map = zeroed_words(2 * nstate)
        self._maps = [fault_map, latency_map, log_map]
        s = self._s = ffi.new("struct fault_loop *")
        s.uffd, s.sock, s.stopfd = missing.fileno(), sock, self._loop.stopfd
        s.state, s.nstate, s.dst_regions, s.ndst = state, nstate, regions, nregions
        s.src_regions, s.nsrc = self._src_regions, len(src.regions)
        s.page_size, s.window, s.buf = page_size, window, self._buf
        s.fault_ns, s.latency_ns, s.latency_cap = self._fault_ns, self._latency_ns, LATENCIES
        s.log, s.log_cap = self._log, nstate

    async def run(self) -> None:
        """Serve until ``stop`` (or the loop fails: ``failure``, and ``ended`` is set)."""
        try:
            rc = await self._loop.run(lambda: lib.fault_serve(self._s))
            if rc == lib.FAULT_ENDED:
                self.ended.set()
                rc = await self._loop.run(lambda: lib.fault_serve(self._s))
            if rc != lib.FAULT_STOPPED:
                self.failure = loop_failure(rc, self._s.error_at, peer="source", doing="installing requested pages")
        finally:
            self.ended.set()

    def stop(self) -> None:
        self._loop.stop()

    def statistics(self) -> FaultLoopStats:
        s = self._s
        return FaultLoopStats(faults=s.faults, requested_pages=s.requested_pages, installed_pages=s.installed_pages,
                              zero_filled=s.zero_filled,
                              latencies_s=tuple(self._latency_ns[i] / 1e9 for i in range(s.latency_len)))

    def record_digests(self, digests: PageDigests) -> None:
        """The answered pages' hashes into the page digest table (once the loop has returned, or
        has seen the source's end record)."""
        record_log(digests, self._log, self._s)

    def close(self) -> None:
        self._loop.close()
