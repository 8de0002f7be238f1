#!/usr/bin/env python3
"""Benchmark the guest workload: page writes per second, unthrottled and throttled.

Measured in one run, on the same machine state:
  baseline   numpy writing the same bytes per page (32-byte header + 1 KiB chunk) to random
             pages of a region of the same size: what plain page touching costs here
  loop       the compiled workload called in this process (no control thread, no pacing)
  guest      a real `migrator guest` process, unthrottled, counted through its control socket
  throttled  real guests at fixed rates: achieved rate vs the target (goal: within 10 %)

Goals: guest >= 1,000,000 page writes/s; throttled error <= 10 %.
Usage: scripts/bench_guest.py [--size 256M] [--fill random] [--seconds 2] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from migrator.guest.layout import Settings, parse_size
from migrator.guest.mapping import RegionMapping
from migrator.guest.spawn import spawn_guest
from harness.bench import finish
from migrator.guest.workload import Workload

UNTHROTTLED_GOAL = 1_000_000
RATE_TOLERANCE_PCT = 10.0
THROTTLED_RATES = (20_000, 200_000)
BYTES_PER_WRITE = 32 + 1024


def numpy_baseline(size: int, seconds: float) -> float:
    """Scattered writes of BYTES_PER_WRITE to random pages of a fresh, touched region."""
    region = np.zeros(size // 8, dtype=np.uint64).reshape(-1, 512)
    region[:, 0] = 1   # touch every page first, as the guest's initial fill does
    rng = np.random.default_rng(1)
    words = BYTES_PER_WRITE // 8
    block = rng.integers(0, 2**63, size=(4096, words), dtype=np.uint64)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        pages = rng.integers(0, region.shape[0], size=block.shape[0])
        region[pages, :words] = block
        done += block.shape[0]
    return done / (time.perf_counter() - started)


def compiled_loop(size: int, fill: str, seconds: float) -> float:
    workload = Workload.create(RegionMapping(size), Settings(fill=fill))
    workload.run(10_000)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        workload.run(100_000)
        done += 100_000
    return done / (time.perf_counter() - started)


def guest_rate(size: int, fill: str, seconds: float, rate: float | None, sockdir: str) -> float:
    control = os.path.join(sockdir, f"bench-{rate}.sock")
    with spawn_guest(control, size=size, dirty_rate=rate, fill=fill, extra_args=("--exit-with-parent",)) as guest:
        with guest.client() as client:
            time.sleep(0.3)   # past start-up and the first batches
            s0, t0 = client.stats()["steps"], time.monotonic()
            time.sleep(seconds)
            s1, t1 = client.stats()["steps"], time.monotonic()
    return (s1 - s0) / (t1 - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"), help="region size (default 256M)")
    parser.add_argument("--fill", choices=("random", "text", "sparse"), default="random")
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per figure")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write results as JSON (- = stdout)")
    args = parser.parse_args()

    baseline = numpy_baseline(args.size, args.seconds)
    loop = compiled_loop(args.size, args.fill, args.seconds)
    with tempfile.TemporaryDirectory(prefix="bench-guest-", dir="/tmp") as sockdir:
        unthrottled = guest_rate(args.size, args.fill, args.seconds, None, sockdir)
        throttled = {rate: guest_rate(args.size, args.fill, args.seconds, rate, sockdir) for rate in THROTTLED_RATES}

    goals = [{
        "name": "unthrottled page writes/s (guest process)",
        "value": round(unthrottled), "baseline": round(baseline), "target": UNTHROTTLED_GOAL,
        "met": unthrottled >= UNTHROTTLED_GOAL,
    }]
    for rate, achieved in throttled.items():
        error = abs(achieved - rate) / rate * 100
        goals.append({
            "name": f"throttled rate error % at {rate} pages/s",
            "value": round(error, 2), "baseline": rate, "target": RATE_TOLERANCE_PCT,
            "met": error <= RATE_TOLERANCE_PCT, "achieved": round(achieved),
        })
    result = {
        "size": args.size, "fill": args.fill, "seconds": args.seconds,
        "numpy_scattered_writes_per_s": round(baseline),
        "compiled_loop_writes_per_s": round(loop),
        "guest_unthrottled_writes_per_s": round(unthrottled),
        "goals": goals,
    }

    print(f"guest workload, {args.size >> 20} MiB, fill {args.fill}, {args.seconds:g} s per figure", file=sys.stderr)
    print(f"  baseline (numpy, {BYTES_PER_WRITE} B to random pages): {baseline:12,.0f} pages/s", file=sys.stderr)
    print(f"  compiled loop in-process:       {loop:12,.0f} pages/s  ({loop / baseline:.2f}x baseline)", file=sys.stderr)
    print(f"  guest process, unthrottled:     {unthrottled:12,.0f} pages/s  ({unthrottled / baseline:.2f}x baseline)", file=sys.stderr)
    for rate, achieved in throttled.items():
        print(f"  guest process at {rate:>9,} /s:  {achieved:12,.0f} pages/s  ({(achieved - rate) / rate * 100:+.2f} %)", file=sys.stderr)
    return finish(result, goals, args.json, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
