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

import os

from ..core.digest import PageDigests
from ..core.errors import MigrationFailed, RemoteProtocolError, TransportError
from ..core.nativeloop import NativeLoop, zeroed_words
from ..core.pagestate import PageStates
from ..native.pages import ffi, lib


class NativeRequests:
    """The loop's state, buffers and socket (owned: ``close``)."""

    def __init__(self, sock: int, memory, states: PageStates) -> None:
        self._sock = sock
        self._loop = NativeLoop()
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
        """Answer until ``finish`` stops the loop; a failure of the link or the guest is raised."""
        rc = self.result = await self._loop.run(lambda: lib.request_serve(self._s), on_cancel=self._abort)
        if rc != lib.FAULT_STOPPED:
            raise self._error(rc)

    def _abort(self) -> None:
        self._s.abort = 1

    def stop(self) -> None:
        """Ask the loop to finish its answer, send the end record and return."""
        self._loop.stop()

    def _error(self, rc: int) -> Exception:
        s = self._s
        if rc == lib.FAULT_PEER_CLOSED:
            return TransportError("the destination closed the urgent link")
        if rc == lib.FAULT_BAD_RECORD:
            return RemoteProtocolError(f"the destination requested pages at {s.error_at:#x} outside the layout or too many")
        if rc == lib.FAULT_LOG_FULL:
            return MigrationFailed("the request loop claimed more pages than the guest has")
        if s.error_at:
            return OSError(-rc, f"reading requested pages at {s.error_at:#x} from the guest: {os.strerror(-rc)}")
        return TransportError(f"the urgent link failed: {os.strerror(-rc)}")

    @property
    def answered_bytes(self) -> int:
        """Bytes written on the link so far (read while the loop runs)."""
        return self._s.answered_bytes

    @property
    def requests(self) -> int:
        return self._s.requests

    @property
    def claimed_pages(self) -> int:
        return self._s.claimed_pages

    @property
    def duplicate_pages(self) -> int:
        return self._s.duplicate_pages

    def record_digests(self, digests: PageDigests) -> None:
        """The hashes of the pages this loop sent first into the page digest (after it returned)."""
        n = self._s.log_len
        if digests.record_indexed(self._log, n) != n:
            raise AssertionError("the request loop logged a page outside the layout")
        self._s.log_len = 0

    def close(self) -> None:
        self._loop.close()
        if self._sock is not None:
            os.close(self._sock)
            self._sock = None
