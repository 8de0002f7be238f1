"""The tracker comparison: what tracking costs the guest and the migrator, tracker by tracker.

Guest slowdown: one guest writes as fast as it can; for a fixed window it runs untracked, then
watched by each tracker in turn (``collect()`` every ``interval_s``, as pre-copy rounds would),
alternating so that drift in the shared machine's load hits every tracker alike. The guest's
steps per second in each window, against the untracked windows, is the slowdown; the migrator's
CPU seconds in the window include the collecting thread and, for ``sync-wp``, the fault-resolver
thread. The other half of the table (CPU per round, bytes, downtime) comes from the grid's
``tracker`` sweep, migrations of the same guests with each tracker.

This is the measurement behind the seed's claim that WP_ASYNC beats synchronous write-protect:
with ``sync-wp`` every first write to a protected page stops the guest's writer until the
migrator's thread resolves the fault (tens of microseconds across vCPUs); with ``wp-async`` the
kernel resolves it in place.

Synchronous (blocking) code: run it in a worker thread. Needs what a migration needs: the guest's
control socket and ptrace-read rights over it.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass

from ..core.runs import count_pages
from ..guest.client import GuestClient
from ..source.attach import attach_mode
from ..tracker import open_tracker
from .grid import CompareSettings

UNTRACKED = "untracked"


@dataclass(frozen=True)
class Window:
    """One tracking window: how far the guest got and what watching it cost."""

    tracker: str          # a tracker name or "untracked"
    repeat: int
    seconds: float
    steps: int            # guest steps (page writes) done in the window
    collects: int
    pages_collected: int
    cpu_s: float          # this process's CPU seconds (all threads) in the window

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tracking_window(control: str, tracker: str, *, window_s: float, interval_s: float, repeat: int = 0) -> Window:
    """Watch the guest at ``control`` with ``tracker`` (or none: ``UNTRACKED``) for ``window_s``."""
    with GuestClient(control) as probe:
        if tracker == UNTRACKED:
            return _timed(probe, tracker, repeat, window_s, interval_s, collect=None)
        with GuestClient(control) as owner:   # a sync-wp registration lives as long as this
            attachment = owner.attach(attach_mode(tracker))
            if attachment.memfd is not None:
                os.close(attachment.memfd)
            layout = attachment.layout
            with open_tracker(tracker, pid=layout.pid, regions=layout.regions, uffd=attachment.uffd,
                              page_size=layout.page_size) as watcher:
                watcher.arm()
                return _timed(probe, tracker, repeat, window_s, interval_s, collect=watcher.collect)


def _timed(probe: GuestClient, tracker: str, repeat: int, window_s: float, interval_s: float, collect) -> Window:
    collects = pages = 0
    cpu = process_cpu_s()
    steps = probe.stats()["steps"]
    started = time.perf_counter()
    deadline = started + window_s
    while (now := time.perf_counter()) < deadline:
        time.sleep(min(interval_s, deadline - now))
        if collect is not None:
            pages += count_pages(collect())
            collects += 1
    steps = probe.stats()["steps"] - steps
    seconds = time.perf_counter() - started
    return Window(tracker, repeat, seconds, steps, collects, pages, process_cpu_s() - cpu)


def measure_slowdown(control: str, settings: CompareSettings, log=lambda line: None) -> list[Window]:
    """Alternate untracked and tracked windows over the guest at ``control``, ``repeats`` times."""
    windows = []
    for repeat in range(settings.repeats):
        for tracker in (UNTRACKED, *settings.trackers):
            window = tracking_window(control, tracker, window_s=settings.window_s,
                                     interval_s=settings.interval_s, repeat=repeat)
            log(f"  {tracker:>10}: {window.steps_per_s:12,.0f} steps/s, {window.cpu_s:.3f} s CPU, "
                f"{window.pages_collected} pages in {window.collects} collects")
            windows.append(window)
    return windows


def slowdown_table(windows: list[Window]) -> list[dict]:
    """Per tracker: median steps/s, slowdown against the untracked median, migrator CPU share."""
    by_tracker: dict[str, list[Window]] = {}
    for w in windows:
        by_tracker.setdefault(w.tracker, []).append(w)
    base = statistics.median(w.steps_per_s for w in by_tracker.get(UNTRACKED, [])) if UNTRACKED in by_tracker else None
    table = []
    for tracker, group in by_tracker.items():
        rate = statistics.median(w.steps_per_s for w in group)
        collects = sum(w.collects for w in group)
        table.append({
            "tracker": tracker,
            "windows": len(group),
            "steps_per_s": rate,
            "steps_per_s_min": min(w.steps_per_s for w in group),
            "steps_per_s_max": max(w.steps_per_s for w in group),
            "relative": rate / base if base else None,
            "slowdown_pct": (1 - rate / base) * 100 if base else None,
            "cpu_share": sum(w.cpu_s for w in group) / sum(w.seconds for w in group),
            "pages_per_collect": sum(w.pages_collected for w in group) / collects if collects else None,
        })
    return table


def _median_known(values) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


MIGRATION_KEYS = ("tracker", "pattern", "dirty_pct", "bandwidth_cap")


def migration_table(rows: list[dict]) -> list[dict]:
    """The ``tracker`` sweep's rows grouped by (tracker, pattern, rate, cap): medians over repeats."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["sweep"] == "tracker" and r["result"] == "committed":
            groups.setdefault(tuple(r[k] for k in MIGRATION_KEYS), []).append(r)
    table = []
    for key, group in groups.items():
        def median(column: str) -> float:
            return statistics.median(r[column] for r in group)

        entry = dict(zip(MIGRATION_KEYS, key))
        entry.update(
            runs=len(group), guest_rate_during=_median_known(r["guest_rate_during"] for r in group),
            rounds=median("rounds"), cpu_s=median("cpu_s"),
            cpu_s_per_round=median("cpu_s_per_round"), sent_over_size=median("sent_over_size"),
            bytes_wire=median("bytes_wire"), downtime_ms=median("downtime_ms"), total_s=median("total_s"),
            rules=sorted({r["rule"] for r in group}),
        )
        table.append(entry)
    return table
