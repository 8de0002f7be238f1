"""A trace as values: the mappings a tracked process had, and per interval the runs it wrote.

Runs are ``(address, pages)`` with absolute addresses, sorted and non-overlapping within their
mapping. ``TraceRecorder`` builds a trace one interval at a time, giving each distinct mapping
(start, end, path) one index, so a layout that stays put costs nothing per interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Run = tuple[int, int]


@dataclass(frozen=True, slots=True)
class TraceMapping:
    start: int
    end: int
    path: str   # "" for anonymous memory

    @property
    def label(self) -> str:
        return self.path or f"anon@{self.start:#x}"


@dataclass(frozen=True, slots=True)
class UntrackedMapping:
    start: int
    end: int
    path: str
    reason: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class TraceInterval:
    """One scan: it ended ``t`` seconds after the attach and covered the ``seconds`` before."""

    t: float
    seconds: float
    mappings: tuple[int, ...]                       # indices of the mappings tracked in it
    written: tuple[tuple[int, tuple[Run, ...]], ...]  # (mapping index, runs) for those written

    @property
    def dirty_pages(self) -> int:
        return sum(pages for _, runs in self.written for _, pages in runs)

    @property
    def start(self) -> float:
        return self.t - self.seconds


@dataclass(frozen=True, slots=True)
class Trace:
    page_size: int
    pid: int
    command: str
    interval_s: float
    stopped_ms: float
    mappings: tuple[TraceMapping, ...]
    untracked: tuple[UntrackedMapping, ...]
    intervals: tuple[TraceInterval, ...]

    def pages_of(self, interval: TraceInterval) -> set[int]:
        return interval_pages(interval, self.page_size)

    def tracked_pages(self, interval: TraceInterval) -> int:
        """Pages in the mappings tracked during ``interval``."""
        return sum(self.mappings[i].end - self.mappings[i].start for i in interval.mappings) // self.page_size


def interval_pages(interval: TraceInterval, page_size: int) -> set[int]:
    """The page numbers (address // page size) ``interval`` wrote."""
    shift = page_size.bit_length() - 1
    pages: set[int] = set()
    for _, runs in interval.written:
        for address, count in runs:
            first = address >> shift
            pages.update(range(first, first + count))
    return pages


class TraceRecorder:
    """Collects intervals into a ``Trace``."""

    def __init__(self, *, page_size: int, pid: int, command: str, interval_s: float, stopped_ms: float,
                 untracked: Iterable[UntrackedMapping] = ()) -> None:
        self._head = dict(page_size=page_size, pid=pid, command=command, interval_s=interval_s, stopped_ms=stopped_ms)
        self._untracked: dict[tuple[int, int, str], UntrackedMapping] = {}
        self._index: dict[TraceMapping, int] = {}
        self._intervals: list[TraceInterval] = []
        self.add_untracked(untracked)

    def add_untracked(self, untracked: Iterable[UntrackedMapping]) -> None:
        for u in untracked:
            self._untracked.setdefault((u.start, u.end, u.path), u)

    def _id(self, mapping: TraceMapping) -> int:
        return self._index.setdefault(mapping, len(self._index))

    def add(self, t: float, seconds: float, tracked: Sequence[TraceMapping],
            written: Iterable[tuple[TraceMapping, Sequence[Run]]]) -> TraceInterval:
        ids = tuple(self._id(m) for m in tracked)
        runs = tuple(sorted((self._id(m), tuple(r)) for m, r in written if r))
        interval = TraceInterval(t=t, seconds=seconds, mappings=ids, written=runs)
        self._intervals.append(interval)
        return interval

    @property
    def intervals(self) -> Sequence[TraceInterval]:
        return self._intervals

    @property
    def mappings(self) -> tuple[TraceMapping, ...]:
        return tuple(self._index)

    def trace(self) -> Trace:
        return Trace(**self._head, mappings=tuple(self._index), untracked=tuple(self._untracked.values()),
                     intervals=tuple(self._intervals))
