"""A native loop on a worker thread that trio can stop: post-copy's fault loops.

Such a loop (``migrator/native/postcopy.c``) sleeps in ``poll`` on its file descriptors and an
eventfd, never holds the GIL, and returns when the eventfd is written. ``run`` calls it on a
worker thread owned by the calling task; if that task is cancelled, the eventfd is written
(after ``on_cancel``, which may say how to stop) and the call returns soon after, so a
cancelled migration never leaves a thread behind.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import trio

from ..native.pages import ffi, lib
from .digest import PageDigests
from .errors import RemoteProtocolError, TransportError


class NativeLoop:
    """The stop eventfd of one native loop, and the socket it serves (both owned: ``close``)."""

    def __init__(self, sock: int) -> None:
        self.sock: int | None = sock
        self.stopfd: int | None = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def stop(self) -> None:
        """Tell the loop to return (it finishes what its contract says it finishes first)."""
        if self.stopfd is not None:
            os.eventfd_write(self.stopfd, 1)

    async def run(self, call: Callable[[], int], *, on_cancel: Callable[[], None] | None = None) -> int:
        """``call()`` (a cffi call that releases the GIL) on a worker thread; its result."""
        returned = False

        async def stop_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if not returned:
                    if on_cancel is not None:
                        on_cancel()
                    self.stop()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_when_cancelled)
            try:
                result = await trio.to_thread.run_sync(call)
            finally:
                returned = True
                nursery.cancel_scope.cancel()
        return result

    def close(self) -> None:
        for name in ("stopfd", "sock"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def zeroed_words(words: int):
    """``words`` 64-bit words of fresh anonymous memory for a loop to fill, and the mapping that
    owns them (keep it as long as the loop runs): zero, and faulted in as the loop writes, not
    when it is made (the switch-over makes the loops' tables inside the downtime)."""
    mapping = mmap.mmap(-1, max(8, 8 * words))
    return ffi.from_buffer("uint64_t[]", mapping), mapping


def loop_failure(rc: int, error_at: int, *, peer: str, doing: str) -> Exception:
    """What a fault loop's return code ``rc`` (not FAULT_STOPPED or FAULT_ENDED) says went wrong,
    typed: the ``peer`` closed the link or sent a bad record, or ``doing`` failed at ``error_at``
    (an errno from the kernel), or the link did."""
    if rc == lib.FAULT_PEER_CLOSED:
        return TransportError(f"the {peer} closed the urgent link")
    if rc == lib.FAULT_BAD_RECORD:
        return RemoteProtocolError(f"the {peer} named pages at {error_at:#x} outside the layout or too many")
    if rc == lib.FAULT_LOG_FULL:
        return RemoteProtocolError(f"the {peer} named more pages than the layout holds")
    if error_at:
        return OSError(-rc, f"{doing} at {error_at:#x}: {os.strerror(-rc)}")
    return TransportError(f"the urgent link failed: {os.strerror(-rc)}")


def record_log(digests: PageDigests, log, loop) -> None:
    """A loop's (page index, hash) log into ``digests``, once it has returned; emptied."""
    if digests.record_indexed(log, loop.log_len) != loop.log_len:
        raise RemoteProtocolError("a page the fault loop moved lies outside the digest table")
    loop.log_len = 0
