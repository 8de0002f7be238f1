"""Worker threads for compression and MACs: coder pools, and jobs that need no nursery.

zstd (de)compressors are not thread-safe. A pool lends each running job a coder of its own and
takes it back afterwards, so there is never more than one per thread at a time and each is
reused across calls. (``list.pop``/``append`` are atomic, so the pool needs no lock; trio asks
not to leave state in its cached worker threads, which rules out ``threading.local``.)

``ThreadJobs`` starts blocking calls on trio's worker threads and returns at once, so a caller
can keep writing earlier frames while later ones are compressed (the Sender), or keep reading
while earlier frames are checked and decompressed (the receivers): a channel is driven by the
tasks that call ``send``, it owns no background task (and so needs no nursery). At most
``limit`` threads work; each takes the next queued job itself (oldest first) and reports every
result back to the trio thread through ``run_sync_soon``. That costs fewer cross-CPU wake-ups
per frame than ``trio.to_thread.run_sync``, whose caller waits for each call.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio
import zstandard

from ..protocol import Compression, PendingFrame, PendingPages

_compressors: dict[int, list[zstandard.ZstdCompressor]] = {}
_decompressors: list[zstandard.ZstdDecompressor] = []


@contextmanager
def _borrowed(pool: list, make: Callable[[], object]) -> Iterator:
    """A coder of ``pool`` that no other thread uses meanwhile (a new one from ``make`` if all
    are busy), given back afterwards."""
    try:
        coder = pool.pop()
    except IndexError:
        coder = make()
    try:
        yield coder
    finally:
        pool.append(coder)


def finish_frame(pending: PendingFrame) -> tuple[tuple, float]:
    """Worker thread: compress and seal one frame. Returns its parts and the seconds it took."""
    started = time.perf_counter()
    compression: Compression = pending.compression
    if compression.level is None:
        return pending.finish_parts(None), time.perf_counter() - started
    with _borrowed(_compressors.setdefault(compression.level, []), compression.compressor) as compressor:
        return pending.finish_parts(compressor), time.perf_counter() - started


def decode_pages(pending: PendingPages):
    """Worker thread: check and decompress one received Pages frame. Returns (Pages, seconds)."""
    started = time.perf_counter()
    with _borrowed(_decompressors, zstandard.ZstdDecompressor) as decompressor:
        return pending.decode(decompressor), time.perf_counter() - started


class Job:
    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self._value: object = None
        self._error: BaseException | None = None

    def _finish(self, value: object, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self.done.set()

    def result(self) -> object:
        """The function's return value (or its exception, raised); only once ``done`` is set."""
        if self._error is not None:
            raise self._error
        return self._value


class ThreadJobs:
    def __init__(self, limit: int, name: str) -> None:
        self._limit = max(1, limit)
        self._name = name           # of the threads, as ps and perf show them
        self._lock = threading.Lock()
        self._waiting: deque[Job] = deque()
        self._workers = 0
        self._token = trio.lowlevel.current_trio_token()

    def submit(self, fn: Callable[[], object]) -> Job:
        job = Job(fn)
        with self._lock:
            self._waiting.append(job)
            start = self._workers < self._limit
            if start:
                self._workers += 1
        if start:
            trio.lowlevel.start_thread_soon(self._work, _ignore, name=self._name)
        return job

    def _work(self) -> None:
        """Worker thread: run queued jobs until none is left, so consecutive jobs do not wait
        for a round trip through the event loop."""
        while True:
            with self._lock:
                if not self._waiting:
                    self._workers -= 1
                    return
                job = self._waiting.popleft()
            try:
                value, error = job.fn(), None
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the job
                value, error = None, exc
            try:
                self._token.run_sync_soon(job._finish, value, error)
            except trio.RunFinishedError:
                pass  # trio.run is over: nobody is waiting for this frame any more


def _ignore(outcome) -> None:
    pass
