#!/usr/bin/env python3
"""Benchmark ``track --pid`` (attaching to a process that knows nothing of migrator), baselines
from the same run, on the C target of the tests (scripts/harness/attach_target.c, built with cc).

  stop        how long one attach stops the target's thread, with the target holding
              ``--size`` of memory in ``--mappings`` populated anonymous mappings (repeated)
  throughput  a thread of the target writing random pages of a mapping as fast as it can: its
              writes/s untracked, then tracked at 100 ms intervals, back to back (repeated,
              medians), for a 16 MiB and a 256 MiB mapping (THP-backed until tracking starts:
              write-protection splits huge pages, so random writes over more than the TLB
              reaches slow down for the rest of the process's life; see docs/results.md)
  redis       if redis-server and redis-benchmark are installed: requests/s of SET/GET over a
              unix socket untracked, then with redis-server tracked at 100 ms, back to back
  exact       pages written by the target in known places, reported exactly, across threads and
              a mapping created while tracked

Goals (issue 15): the attach stops a 1 GiB, 100-mapping target for at most 5 ms; the target's own
throughput tracked at 100 ms is at least 0.9x untracked; exact write sets.
The prediction against a replayed migration is scripts/bench_replay.py's.
Usage: scripts/bench_attach.py [--size 1G] [--mappings 100] [--repeats 5] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness.attach import PAGE, Target, build, pages_in  # noqa: E402
from harness.bench import finish, goal  # noqa: E402

from migrator.core import units  # noqa: E402
from migrator.tracker.target import attach  # noqa: E402


def measure_stop(binary: Path, size: int, mappings: int, repeats: int) -> list[float]:
    target = Target(binary)
    try:
        per = size // mappings // PAGE
        for _ in range(mappings):
            region = target.map(per)
            target.write(region, 0, per)
        stops = []
        for _ in range(repeats):
            with attach(target.pid) as tracker:
                stops.append(tracker.stopped_s * 1e3)
        return stops
    finally:
        target.close()


def rate(target: Target, seconds: float, tracker=None, interval: float = 0.1) -> float:
    start_count, start = target.count(), time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        time.sleep(interval)
        if tracker is not None:
            tracker.collect()
    return (target.count() - start_count) / (time.monotonic() - start)


def measure_throughput(binary: Path, repeats: int, size: int) -> tuple[list[float], list[float]]:
    target = Target(binary)
    try:
        pages = size // PAGE
        region = target.map(pages)
        target.write(region, 0, pages)
        target.ask(f"churn {region:x} {pages}")
        time.sleep(0.5)
        plain, tracked = [], []
        for _ in range(repeats):
            plain.append(rate(target, 1.0))
            with attach(target.pid) as tracker:
                tracked.append(rate(target, 1.0, tracker))
        return plain, tracked
    finally:
        target.close()


def redis_rps(sock: str) -> float:
    out = subprocess.run(["redis-benchmark", "-s", sock, "-t", "set,get", "-n", "200000", "-r", "100000",
                          "-d", "256", "-q"], capture_output=True, text=True, timeout=300, check=True).stdout
    rates = [float(line.split(":")[1].split()[0]) for line in out.replace("\r", "\n").splitlines()
             if "requests per second" in line]
    return statistics.mean(rates)


def measure_redis(repeats: int) -> tuple[list[float], list[float]] | None:
    if not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
        return None
    with tempfile.TemporaryDirectory() as scratch:
        sock = f"{scratch}/redis.sock"
        server = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock, "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(sock):
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
            redis_rps(sock)   # warm up: the data set exists in both measurements
            plain, tracked = [], []
            for _ in range(repeats):
                plain.append(redis_rps(sock))
                with attach(server.pid) as tracker:
                    result: list[float] = []
                    load = threading.Thread(target=lambda: result.append(redis_rps(sock)))
                    load.start()
                    while load.is_alive():
                        time.sleep(0.1)
                        tracker.collect()
                    tracked.append(result[0])
            return plain, tracked
        finally:
            server.kill()
            server.wait(timeout=10)


def exact_sets(binary: Path) -> bool:
    target = Target(binary)
    try:
        region = target.map(256)
        with attach(target.pid) as tracker:
            tracker.collect()
            ok = True
            for step in range(5):
                expected = {(step * 37 + k * 11) % 256 for k in range(20)}
                for page in expected:
                    target.write(region, page, 1, thread=bool(page % 2))
                fresh = target.map(4)
                target.write(fresh, 2, 1)
                interval = tracker.collect()
                got = set().union(*(pages_in(r, region, 256) for r in interval.written.values()))
                got_fresh = set().union(*(pages_in(r, fresh, 4) for r in interval.written.values()))
                ok &= got == expected and got_fresh == {2}
        return ok
    finally:
        target.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=units.parse_size, default=1 << 30)
    parser.add_argument("--mappings", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", nargs="?", const="-", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        binary = build(Path(scratch))
        stops = measure_stop(binary, args.size, args.mappings, args.repeats)
        print(f"stop: {args.size >> 20} MiB in {args.mappings} mappings: median {statistics.median(stops):.3f} ms, "
              f"max {max(stops):.3f} ms")
        result: dict = {"stop_ms": stops}
        ratios = {}
        for size in (16 << 20, 256 << 20):
            plain, tracked = measure_throughput(binary, args.repeats, size)
            ratios[size] = statistics.median(tracked) / statistics.median(plain)
            result[f"churn_{size >> 20}M"] = {"plain_writes_s": plain, "tracked_writes_s": tracked}
            print(f"throughput, random writes over {size >> 20} MiB: untracked {statistics.median(plain):,.0f} "
                  f"writes/s, tracked at 100 ms {statistics.median(tracked):,.0f} writes/s ({ratios[size]:.3f}x)")
        redis = measure_redis(args.repeats)
        if redis is not None:
            ratios["redis"] = statistics.median(redis[1]) / statistics.median(redis[0])
            result["redis"] = {"plain_rps": redis[0], "tracked_rps": redis[1]}
            print(f"redis-benchmark SET/GET: untracked {statistics.median(redis[0]):,.0f} req/s, tracked at 100 ms "
                  f"{statistics.median(redis[1]):,.0f} req/s ({ratios['redis']:.3f}x)")
        exact = exact_sets(binary)
        result["exact"] = exact
        print(f"exact sets: {'yes' if exact else 'NO'}")
    real = "redis" if "redis" in ratios else 16 << 20
    goals = [
        goal("attach stop, ms (median)", statistics.median(stops), None, 5.0, statistics.median(stops) <= 5.0),
        goal(f"throughput tracked / untracked ({'redis-benchmark' if real == 'redis' else 'random writes, 16 MiB'})",
             ratios[real], 1.0, 0.9, ratios[real] >= 0.9),
        goal("exact write sets", exact, None, True, exact),
    ]
    return finish(result, goals, args.json)


if __name__ == "__main__":
    sys.exit(main())
