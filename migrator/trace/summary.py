"""What a user reads about a trace: the JSON of ``migrator track`` and ``migrator trace show``.

``dirty_rate`` is pages written per second, the mean over the intervals (every page counted once
per interval, as QEMU's ``calc-dirty-rate`` counts a sampled page once per period);
``wss_pages`` the distinct pages written over the whole run.
"""

from __future__ import annotations

from collections import Counter

from collections.abc import Sequence

from .model import Trace, TraceInterval, TraceMapping

MB = 1_000_000


def interval_record(mappings: Sequence[TraceMapping], interval: TraceInterval) -> dict:
    per_mapping: Counter[str] = Counter()
    for index, runs in interval.written:
        per_mapping[mappings[index].label] += sum(pages for _, pages in runs)
    return {"t": round(interval.t, 6), "seconds": round(interval.seconds, 6),
            "dirty_pages": interval.dirty_pages, "mappings": dict(per_mapping.most_common())}


def summarize(trace: Trace) -> dict:
    seconds = sum(i.seconds for i in trace.intervals)
    dirty = sum(i.dirty_pages for i in trace.intervals)
    written: set[int] = set()
    for interval in trace.intervals:
        written |= trace.pages_of(interval)
    rate = dirty / seconds if seconds > 0 else 0.0
    return {
        "pid": trace.pid,
        "command": trace.command,
        "page_size": trace.page_size,
        "interval_s": trace.interval_s,
        "duration_s": round(seconds, 6),
        "stopped_ms": round(trace.stopped_ms, 3),
        "dirty_rate": round(rate, 3),
        "dirty_mb_s": round(rate * trace.page_size / MB, 3),
        "wss_pages": len(written),
        "tracked_pages": max((trace.tracked_pages(i) for i in trace.intervals), default=0),
        "untracked": [{"start": u.start, "end": u.end, "path": u.path, "size": u.size, "reason": u.reason}
                      for u in trace.untracked],
        "intervals": [interval_record(trace.mappings, i) for i in trace.intervals],
    }


def live_line(mappings: Sequence[TraceMapping], page_size: int, interval: TraceInterval, wss_pages: int,
              *, busiest: int = 3) -> str:
    """One line per interval: dirty pages and MB/s, the working set so far, the busiest mappings."""
    record = interval_record(mappings, interval)
    rate = interval.dirty_pages * page_size / MB / interval.seconds if interval.seconds > 0 else 0.0
    top = ", ".join(f"{label} {pages}" for label, pages in list(record["mappings"].items())[:busiest])
    return (f"{interval.t:8.2f}s  dirty {interval.dirty_pages:>8} pages  {rate:8.2f} MB/s  "
            f"wss {wss_pages:>9} pages ({wss_pages * page_size / MB:.1f} MB)" + (f"  [{top}]" if top else ""))


def untracked_lines(trace: Trace) -> list[str]:
    return [f"untracked {u.start:#x}-{u.end:#x} {u.size >> 10} KiB {u.path or '[anonymous]'}: {u.reason}"
            for u in trace.untracked]
