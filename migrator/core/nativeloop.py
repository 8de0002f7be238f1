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

from ..native.pages import ffi


class NativeLoop:
    """The stop eventfd of one native loop (owned: ``close``)."""

    def __init__(self) -> None:
        self.stopfd: int | None = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def __enter__(self) -> NativeLoop:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

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
        if self.stopfd is not None:
            os.close(self.stopfd)
            self.stopfd = None


def zeroed_words(words: int):
    """``words`` 64-bit words of fresh anonymous memory for a loop to fill, and the mapping that
    owns them (keep it as long as the loop runs): zero, and faulted in as the loop writes, not
    when it is made (the switch-over makes the loops' tables inside the downtime)."""
    mapping = mmap.mmap(-1, max(8, 8 * words))
    return ffi.from_buffer("uint64_t[]", mapping), mapping
