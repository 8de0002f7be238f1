"""The source's native request loop: the destination's faults answered without Python
(``request_serve`` in ``migrator/native/postcopy.c``).

Used after the switch when the session's urgent link could be handed over
(``Channel.native_faults``): one worker thread reads request records, claims their pages in
the delivery's page-state table (the push claims from the same table, so each page is first
sent once), reads them from the frozen guest and writes the answer at once. ``finish`` stops
it after the push: it completes the answer it is writing, sends the end record, and the
hashes of the pages it sent first go into the page digest, which the destination compares
after the end record, so no page it claimed can be missing from either.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.digest import PageDigests
from ..core.nativeloop import NativeLoop, loop_failure, record_log, zeroed_words
from ..core.pagestate import PageStates
from ..native.pages import ffi, lib


@dataclass(frozen=True, slots=True)
class RequestLoopStats:
    requests: int
    claimed_pages: int           # pages first sent by the loop
    duplicate_pages: int         # asked for after the push (or an answer) had sent them: sent again
    answered_bytes: int          # written on the link, records and pages


class NativeRequests:
    """The loop's state, buffers and socket (owned: ``close``)."""

    def __init__(self, sock: int, memory, states: PageStates) -> None:
        self._loop = NativeLoop(sock)
        state, nstate, regions, nregions, page_size = states.c_arguments()
        pid, mapped, mem_regions, nmem = memory.native_reader()
        self._keep = [regions, mem_regions, memory]
        self._buf = ffi.new("uint8_t[]", 16 + lib.FAULT_MAX_PAGES * page_size)
        self._log, self._log_map = zeroed_words(2 * nstate)
        s = self._s = ffi.new("struct request_loop *")
        s.sock, s.stopfd, s.pid, s.map, s.mem_regions, s.nmem = sock, self._loop.stopfd, pid, mapped, mem_regions, nmem
        s.state, s.nstate, s.regions, s.nregions, s.page_size = state, nstate, regions, nregions, page_size
        s.buf, s.log, s.log_cap = self._buf, self._log, nstate
        self.result: int | None = None

    async def run(self) -> None:
        """Answer until ``stop``; a failure of the link or the guest is raised."""
        rc = self.result = await self._loop.run(lambda: lib.request_serve(self._s), on_cancel=self._abort)
        if rc != lib.FAULT_STOPPED:
            raise loop_failure(rc, self._s.error_at, peer="destination", doing="reading requested pages from the guest")

    def _abort(self) -> None:
        self._s.abort = 1

    def stop(self) -> None:
        """Ask the loop to finish its answer, send the end record and return."""
        self._loop.stop()

    def statistics(self) -> RequestLoopStats:
        """The loop's counts (``answered_bytes`` also while it runs)."""
        s = self._s
        return RequestLoopStats(requests=s.requests, claimed_pages=s.claimed_pages, duplicate_pages=s.duplicate_pages,
                                answered_bytes=s.answered_bytes)

    def record_digests(self, digests: PageDigests) -> None:
        """The hashes of the pages this loop sent first into the page digest (after it returned)."""
        record_log(digests, self._log, self._s)

    def close(self) -> None:
        self._loop.close()
