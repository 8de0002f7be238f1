"""A trace laid onto a guest region: which data pages each replayed interval writes, and when.

``guest --replay TRACE`` writes the pages a traced process wrote, with the trace's timing. The
trace's tracked mappings are laid onto the data pages one after another in the trace's mapping
order, page offsets preserved within each, so a page of mapping ``m`` at offset ``o`` becomes
data page ``base[m] + o``. Each interval's written runs become the steps of that interval, spread
over the interval's own time span; the loop lasts as long as the trace and then starts again.

The time axis is ``migrator.trace.predict``'s: it starts at the first interval's start, and
intervals that last no time are left out, so the replay writes what ``predict`` simulates. The
plan is a pure value; ``Workload.create`` stores it in the region (workload.h's schedule) so
that a copied guest replays on from where it was, and ``ReplayTimeline`` paces the writer.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.errors import GuestError
from ..core.model import PAGE_SIZE
from ..trace.file import read_trace
from ..trace.model import Trace
from .layout import Geometry

NAME_MAX = 128            # bytes of the trace's name the region keeps (workload.h REPLAY_NAME_MAX)
INTERVAL_BYTES = 24
RUN_BYTES = 16
MAX_DATA_PAGES = 1 << 32  # a run's first page is a u32
MIN_SECONDS = 1e-6        # an interval squeezed to nothing by its neighbour still lasts this long


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """``runs``: (first data page, pages), in step order; ``intervals``: (start s, end s, loop
    steps done by its end); one loop is ``seconds`` long and ``steps`` steps."""

    name: str
    data_pages: int
    runs: tuple[tuple[int, int], ...]
    intervals: tuple[tuple[float, float, int], ...]
    seconds: float

    @property
    def steps(self) -> int:
        return self.intervals[-1][2]

    @property
    def schedule_pages(self) -> int:
        size = NAME_MAX + INTERVAL_BYTES * len(self.intervals) + RUN_BYTES * len(self.runs)
        return -(-size // PAGE_SIZE)

    @property
    def name_bytes(self) -> bytes:
        return self.name.encode("utf-8")[:NAME_MAX].decode("utf-8", "ignore").encode("utf-8")

    def geometry(self, size: int | None = None) -> Geometry:
        """The guest region: the smallest that holds the plan, or ``size`` if that is enough."""
        least = Geometry.for_data(self.data_pages, self.schedule_pages)
        if size is None:
            return least
        if size < least.size:
            raise GuestError(f"--size {size >> 10} KiB is too small to replay {self.name}: it needs at least "
                             f"{least.size >> 10} KiB ({self.data_pages} pages of mappings, "
                             f"{self.schedule_pages} of schedule)")
        return Geometry.for_size(size, self.schedule_pages)


def load_plan(path: str | os.PathLike) -> ReplayPlan:
    """Read and check a trace file (``read_trace`` refuses hostile ones) and plan its replay."""
    return plan(read_trace(path), os.path.basename(os.fspath(path)))


def plan(trace: Trace, name: str) -> ReplayPlan:
    if trace.page_size < PAGE_SIZE or trace.page_size % PAGE_SIZE:
        raise GuestError(f"trace {name}: page size {trace.page_size} is not a multiple of the guest's {PAGE_SIZE}")
    scale = trace.page_size // PAGE_SIZE
    shift = trace.page_size.bit_length() - 1
    bases, data_pages = [], 0
    for mapping in trace.mappings:
        bases.append(data_pages)
        data_pages += ((mapping.end - mapping.start) >> shift) * scale
    if data_pages >= MAX_DATA_PAGES:
        raise GuestError(f"trace {name}: its mappings hold {data_pages} pages, more than a guest can replay")
    if not trace.intervals:
        raise GuestError(f"trace {name} holds no intervals: nothing to replay")
    origin = trace.intervals[0].start
    runs: list[tuple[int, int]] = []
    intervals: list[tuple[float, float, int]] = []
    steps, last_end = 0, 0.0
    for interval in trace.intervals:
        if interval.seconds <= 0:
            continue   # as in predict's timeline: an interval that lasts no time is left out
        start = max(interval.start - origin, last_end)
        end = max(interval.t - origin, start + MIN_SECONDS)
        for index, written in interval.written:
            mapping = trace.mappings[index]
            for address, pages in written:
                first = bases[index] + ((address - mapping.start) >> shift) * scale
                count = pages * scale
                if runs and runs[-1][0] + runs[-1][1] == first:
                    runs[-1] = (runs[-1][0], runs[-1][1] + count)
                else:
                    runs.append((first, count))
                steps += count
        intervals.append((start, end, steps))
        last_end = end
    if steps == 0:
        raise GuestError(f"trace {name} shows no page written: nothing to replay")
    seconds = max(trace.intervals[-1].t - origin, last_end)
    return ReplayPlan(name=name, data_pages=data_pages, runs=tuple(runs), intervals=tuple(intervals),
                      seconds=seconds)


class ReplayTimeline:
    """Steps due over time for a replay (``pacing.Pacer``'s schedule): within each interval its
    steps at an even pace, none between intervals, the loop repeating every ``seconds``."""

    def __init__(self, intervals: Sequence[tuple[float, float, int]], seconds: float) -> None:
        if not intervals or intervals[-1][2] <= 0 or not seconds > 0:
            raise ValueError("a replay timeline needs intervals that write and a positive length")
        self.intervals = list(intervals)
        self.seconds = seconds
        self.steps = intervals[-1][2]
        self._ends = [end for _, end, _ in intervals]
        self._steps_end = [n for _, _, n in intervals]

    def steps_at(self, position: float) -> float:
        """Steps due ``position`` seconds after the start of loop 0."""
        loops = math.floor(position / self.seconds)
        offset = position - loops * self.seconds
        k = bisect.bisect_right(self._ends, offset)
        if k == len(self.intervals):
            return (loops + 1) * self.steps
        start, end, steps_end = self.intervals[k]
        before = self._steps_end[k - 1] if k else 0
        done = before + (steps_end - before) * max(0.0, offset - start) / (end - start)
        return loops * self.steps + done

    def seconds_at(self, steps: int) -> float:
        """When step number ``steps`` (1-based) is due; 0 for 0."""
        if steps <= 0:
            return 0.0
        loops, rest = divmod(steps - 1, self.steps)
        rest += 1
        k = bisect.bisect_left(self._steps_end, rest)   # the first interval whose steps reach it
        start, end, steps_end = self.intervals[k]
        before = self._steps_end[k - 1] if k else 0
        return loops * self.seconds + start + (end - start) * (rest - before) / (steps_end - before)

    def position(self, steps: int) -> tuple[int, int]:
        """(loop, interval index) that step ``steps`` (0-based) belongs to."""
        loops, rest = divmod(steps, self.steps)
        return loops, min(bisect.bisect_right(self._steps_end, rest), len(self.intervals) - 1)
