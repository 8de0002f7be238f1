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

import os

import trio

from ..core.digest import PageDigests, region_table
from ..core.errors import RemoteProtocolError, TransportError
from ..core.model import MemoryLayout
from ..core.nativeloop import NativeLoop, zeroed_words
from ..native.pages import ffi, lib
from .faults import MissingPages

LATENCIES = 1 << 16      # fault latencies kept (the first ones; the counts cover every fault)


class NativeFaults:
    """The loop's state, buffers and socket (owned: ``close``)."""

    def __init__(self, missing: MissingPages, sock: int, src: MemoryLayout, window: int) -> None:
        self._sock = sock
        self._loop = NativeLoop()
        self.ended = trio.Event()          # the source's end record came (or the loop failed)
        self.failure: Exception | None = None
        state, nstate, regions, nregions, page_size = missing.states.c_arguments()
        self._keep = [regions, region_table(src)]
        self._buf = ffi.new("uint8_t[]", lib.FAULT_MAX_PAGES * page_size)
        self._fault_ns, fault_map = zeroed_words(nstate)
        self._latency_ns, latency_map = zeroed_words(LATENCIES)
        self._log, log_map = zeroed_words(2 * nstate)
        self._maps = [fault_map, latency_map, log_map]
        s = self._s = ffi.new("struct fault_loop *")
        s.uffd, s.sock, s.stopfd = missing.fileno(), sock, self._loop.stopfd
        s.state, s.nstate, s.dst_regions, s.ndst = state, nstate, regions, nregions
        s.src_regions, s.nsrc = self._keep[1], len(src.regions)
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
                self.failure = self._error(rc)
        finally:
            self.ended.set()

    def stop(self) -> None:
        self._loop.stop()

    def _error(self, rc: int) -> Exception:
        s = self._s
        if rc == lib.FAULT_PEER_CLOSED:
            return TransportError("the source closed the urgent link")
        if rc == lib.FAULT_BAD_RECORD:
            return RemoteProtocolError(f"the source answered pages at {s.error_at:#x} outside the layout or too many")
        if rc == lib.FAULT_LOG_FULL:
            return RemoteProtocolError("the source answered more pages than were asked for")
        if s.error_at:
            return OSError(-rc, f"installing requested pages at {s.error_at:#x}: {os.strerror(-rc)}")
        return TransportError(f"the urgent link failed: {os.strerror(-rc)}")

    @property
    def faults(self) -> int:
        return self._s.faults

    @property
    def requested_pages(self) -> int:
        return self._s.requested_pages

    @property
    def installed_pages(self) -> int:
        return self._s.installed_pages

    @property
    def zero_filled(self) -> int:
        return self._s.zero_filled

    def latencies(self) -> list[float]:
        """Each answered fault's latency in seconds (fault read to its page installed)."""
        return [self._latency_ns[i] / 1e9 for i in range(self._s.latency_len)]

    def record_digests(self, digests: PageDigests) -> None:
        """The answered pages' hashes into the page digest table (once the loop has returned)."""
        n = self._s.log_len
        done = digests.record_indexed(self._log, n)
        if done != n:
            raise RemoteProtocolError("an answered page lies outside the digest table")
        self._s.log_len = 0

    def close(self) -> None:
        self._loop.close()
        if self._sock is not None:
            os.close(self._sock)
            self._sock = None
