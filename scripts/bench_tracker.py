#!/usr/bin/env python3
"""Benchmark the dirty-page trackers against their baselines, measured in the same run.

For each region size (a scratch process with every page populated, tracked with wp-async):
  collect    ``tracker.collect()`` after the guest wrote 0.1 %, 1 % and 10 % of the pages,
             scattered (single pages) and in runs of 64 pages
  raw        the bare PAGEMAP_SCAN ioctl loop doing the same walk (same flags, same vector,
             pre-built arguments, no conversion to runs): the baseline collect is held to
  arm        PAGEMAP_SCAN WP_MATCHING without output (what arm() does) vs UFFDIO_WRITEPROTECT
             over the region, after every page was written
First-write cost in the guest (contiguous pages, each written once after arm; timed inside the
guest): no tracking (baseline), wp-async, sync-wp (resolver thread in this process).

Goals (issue 2): collect() on 1 GiB with 1 % scattered writes within 2x the raw ioctl time;
the guest's first-write overhead under wp-async at least 10x lower than under sync-wp.
Usage: scripts/bench_tracker.py [--size 1G,4G] [--quick] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

from migrator.tracker import _sys, open_tracker
from harness.bench import finish
from migrator.tracker._uapi import (
    PAGE_IS_WRITTEN,
    PAGEMAP_SCAN,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    ffi,
    libc,
)
from migrator.core.units import parse_size
from migrator.tracker.scan import DEFAULT_VEC_LEN, new_vec
from migrator.tracker.scratch import ScratchProcess

PAGE = 4096
FRACTIONS = (0.001, 0.01, 0.1)
RUN_PAGES = 64
COLLECT_RATIO_TARGET = 2.0
FIRST_WRITE_FACTOR_TARGET = 10.0
TRACK_FLAGS = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC


def pattern(pages: int, fraction: float, kind: str, rng: random.Random) -> list[list[int]]:
    """[first_page, count] runs covering ``fraction`` of ``pages``: single pages or 64-page runs."""
    want = max(1, int(pages * fraction))
    if kind == "scattered":
        return [[p, 1] for p in sorted(rng.sample(range(pages), want))]
    starts = sorted(rng.sample(range(pages // RUN_PAGES), max(1, want // RUN_PAGES)))
    return [[s * RUN_PAGES, RUN_PAGES] for s in starts]


class RawScan:
    """The baseline: PAGEMAP_SCAN in the walk loop with pre-built arguments, nothing else."""

    def __init__(self, pid: int, start: int, end: int) -> None:
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.vec = new_vec(DEFAULT_VEC_LEN)
        self.start, self.end = start, end
        self.arg = ffi.new("struct pm_scan_arg *", {
            "size": ffi.sizeof("struct pm_scan_arg"), "flags": TRACK_FLAGS, "vec": int(ffi.cast("uintptr_t", self.vec)),
            "vec_len": DEFAULT_VEC_LEN, "category_mask": PAGE_IS_WRITTEN, "return_mask": PAGE_IS_WRITTEN})
        self.request = ffi.cast("unsigned long", PAGEMAP_SCAN)

    def __call__(self) -> float:
        arg, vec, fd, request = self.arg, self.vec, self.fd, self.request
        started = time.perf_counter()
        position = self.start
        while position < self.end:
            arg.start, arg.end = position, self.end
            count = libc.ioctl(fd, request, arg)
            if count < 0:
                raise OSError(ffi.errno, "PAGEMAP_SCAN (raw baseline)")
            position = max(arg.walk_end, vec[count - 1].end) if count else arg.walk_end
        return time.perf_counter() - started

    def close(self) -> None:
        os.close(self.fd)


def bench_size(size: int, reps: int, rng: random.Random) -> dict:
    pages = size // PAGE
    result: dict = {"size": size, "patterns": []}
    started = time.perf_counter()
    with ScratchProcess(size, "async", populate=True, timeout=120.0) as child:
        result["populate_s"] = round(time.perf_counter() - started, 2)
        region = child.region
        with open_tracker("wp-async", pid=child.pid, regions=[region], uffd=child.take_uffd()) as tracker:
            t = time.perf_counter()
            populated = tracker.populated()
            result["populated_ms"] = round((time.perf_counter() - t) * 1e3, 3)
            result["populated_pages"] = sum(n for _, n in populated)
            tracker.arm()
            raw = RawScan(child.pid, region.start, region.end)
            try:
                result["arm"] = measure_arm(child, tracker, pages)
                for kind in ("scattered", "runs"):
                    for fraction in FRACTIONS:
                        runs = pattern(pages, fraction, kind, rng)
                        raw_s, collect_s, reported = [], [], 0
                        for rep in range(reps):
                            for which in (("raw", "collect") if rep % 2 == 0 else ("collect", "raw")):
                                child.write(runs)
                                if which == "raw":
                                    raw_s.append(raw())
                                else:
                                    t = time.perf_counter()
                                    reported = len(tracker.collect())
                                    collect_s.append(time.perf_counter() - t)
                        raw_ms, collect_ms = statistics.median(raw_s) * 1e3, statistics.median(collect_s) * 1e3
                        result["patterns"].append({
                            "pattern": kind, "fraction": fraction, "pages": sum(n for _, n in runs),
                            "runs": reported, "raw_ms": round(raw_ms, 3), "collect_ms": round(collect_ms, 3),
                            "ratio": round(collect_ms / raw_ms, 2),
                        })
            finally:
                raw.close()
    return result


def measure_arm(child: ScratchProcess, tracker, pages: int) -> dict:
    """arm()'s scan vs UFFDIO_WRITEPROTECT, each after every page was written."""
    scan_s, wp_s = [], []
    for _ in range(2):
        child.write([[0, pages]])
        t = time.perf_counter()
        tracker.arm()
        scan_s.append(time.perf_counter() - t)
        child.write([[0, pages]])
        t = time.perf_counter()
        _sys.uffdio_writeprotect(tracker.uffd, tracker.regions[0].start, tracker.regions[0].length, protect=True)
        wp_s.append(time.perf_counter() - t)
    return {"scan_ms": round(min(scan_s) * 1e3, 3), "writeprotect_ms": round(min(wp_s) * 1e3, 3)}


def first_write_us(mode: str, pages: int, reps: int) -> float:
    """Median microseconds per first write of a page after arm, timed inside the guest."""
    kind = {"none": None, "async": "wp-async", "sync": "sync-wp"}[mode]
    samples = []
    with ScratchProcess(pages * PAGE, mode, populate=True, timeout=120.0) as child:
        tracker = open_tracker(kind, pid=child.pid, regions=[child.region], uffd=child.take_uffd()) if kind else None
        try:
            for _ in range(reps):
                if tracker:
                    tracker.arm()
                samples.append(child.write([[0, pages]]) / pages * 1e6)
        finally:
            if tracker:
                tracker.close()
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", metavar="SIZE[,SIZE...]",
                        help="region sizes (repeatable or comma-separated; default 1G,4G; --quick: 256M)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, 256M unless --size is given")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write results as JSON (- = stdout)")
    args = parser.parse_args()
    try:
        sizes = [parse_size(s) for item in (args.size or (["256M"] if args.quick else ["1G,4G"]))
                 for s in item.split(",")]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    reps = 3 if args.quick else 7
    rng = random.Random(1)

    results = [bench_size(size, reps, rng) for size in sizes]
    write_pages = 4096 if args.quick else 16384
    first = {mode: first_write_us(mode, write_pages, reps) for mode in ("none", "async", "sync")}
    overhead_async, overhead_sync = first["async"] - first["none"], first["sync"] - first["none"]

    goal_size = min(sizes, key=lambda s: abs(s - (1 << 30)))
    row = next(p for r in results if r["size"] == goal_size for p in r["patterns"]
               if p["pattern"] == "scattered" and p["fraction"] == 0.01)
    goals = [
        {"name": f"collect() ms, {goal_size >> 20} MiB, 1 % scattered (baseline: raw PAGEMAP_SCAN ms)",
         "value": row["collect_ms"], "baseline": row["raw_ms"],
         "target": round(COLLECT_RATIO_TARGET * row["raw_ms"], 3), "met": row["ratio"] <= COLLECT_RATIO_TARGET,
         "ratio": row["ratio"]},
        {"name": "guest first-write overhead us/page, wp-async (baseline: sync-wp)",
         "value": round(overhead_async, 3), "baseline": round(overhead_sync, 3),
         "target": round(overhead_sync / FIRST_WRITE_FACTOR_TARGET, 3),
         "met": overhead_async * FIRST_WRITE_FACTOR_TARGET <= overhead_sync,
         "factor": round(overhead_sync / overhead_async, 1) if overhead_async > 0 else None},
    ]
    report = {"sizes": results, "first_write_us": {k: round(v, 3) for k, v in first.items()},
              "first_write_pages": write_pages, "repetitions": reps, "goals": goals}

    out = sys.stderr
    for r in results:
        print(f"\nwp-async on {r['size'] >> 20} MiB (populated in {r['populate_s']} s; populated() "
              f"{r['populated_ms']} ms; arm: scan {r['arm']['scan_ms']} ms vs UFFDIO_WRITEPROTECT "
              f"{r['arm']['writeprotect_ms']} ms)", file=out)
        print(f"  {'pattern':<10} {'written':>8} {'pages':>8} {'runs':>7} {'raw ms':>9} {'collect ms':>11} {'ratio':>6}", file=out)
        for p in r["patterns"]:
            print(f"  {p['pattern']:<10} {p['fraction'] * 100:>7g}% {p['pages']:>8} {p['runs']:>7} {p['raw_ms']:>9.3f} "
                  f"{p['collect_ms']:>11.3f} {p['ratio']:>6.2f}", file=out)
    print(f"\nfirst write after arm, {write_pages} contiguous pages, us/page (median of {reps}): "
          f"none {first['none']:.3f}, wp-async {first['async']:.3f}, sync-wp {first['sync']:.3f}", file=out)
    return finish(report, goals, args.json, file=out)


if __name__ == "__main__":
    sys.exit(main())
