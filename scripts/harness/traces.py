"""Synthetic traces with a known write pattern, for tests and benchmarks of ``guest --replay``.

A program with a hot set and a sweep: each interval rewrites the same ``hot`` pages at the start
of the first mapping and a window of ``sweep`` pages that moves along the mappings, interval by
interval, wrapping at their end. So the working set of a window of ``k`` intervals is known in
closed form, and a replay can be checked page for page.
"""

from __future__ import annotations

from migrator.trace.model import Trace, TraceMapping, TraceRecorder

PAGE = 4096
BASES = (0x555500000000, 0x7F0000000000)   # two mappings far apart, as a heap and an mmap


def sweep_trace(*, pages: tuple[int, ...] = (4096, 2048), hot: int = 256, sweep: int = 512,
                intervals: int = 20, seconds: float = 0.1) -> Trace:
    """``intervals`` intervals of ``seconds`` each over mappings of ``pages`` pages."""
    if hot >= pages[0] or sweep > sum(pages) - hot:
        raise ValueError("the hot set and the sweep must fit the mappings")
    mappings = [TraceMapping(base, base + n * PAGE, "[heap]" if i == 0 else "")
                for i, (base, n) in enumerate(zip(BASES, pages))]
    recorder = TraceRecorder(page_size=PAGE, pid=1, command="synthetic sweep", interval_s=seconds, stopped_ms=0.0)
    cold = sum(pages) - hot          # the sweep moves over every page outside the hot set
    for k in range(intervals):
        written: dict[int, list[tuple[int, int]]] = {0: [(mappings[0].start, hot)]}
        first = (k * sweep) % cold
        for offset in _wrapped(first, sweep, cold):
            index, at = _locate(hot + offset[0], pages)
            count = min(offset[1], pages[index] - at)
            rest = offset[1] - count
            written.setdefault(index, []).append((mappings[index].start + at * PAGE, count))
            if rest:                 # the window runs on into the next mapping
                written.setdefault(index + 1, []).append((mappings[index + 1].start, rest))
        runs = [(mappings[i], _merged(r)) for i, r in sorted(written.items())]
        recorder.add((k + 1) * seconds, seconds, mappings, runs)
    return recorder.trace()


def _wrapped(first: int, count: int, size: int) -> list[tuple[int, int]]:
    if first + count <= size:
        return [(first, count)]
    return [(first, size - first), (0, count - (size - first))]


def _locate(page: int, pages: tuple[int, ...]) -> tuple[int, int]:
    for index, n in enumerate(pages):
        if page < n:
            return index, page
        page -= n
    raise ValueError("page beyond the mappings")


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for address, count in sorted(runs):
        if out and out[-1][0] + out[-1][1] * PAGE >= address:
            end = max(out[-1][0] + out[-1][1] * PAGE, address + count * PAGE)
            out[-1] = (out[-1][0], (end - out[-1][0]) // PAGE)
        else:
            out.append((address, count))
    return out
