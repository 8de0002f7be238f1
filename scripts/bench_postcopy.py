"""Benchmark: post-copy and the hybrid against pre-copy, with baselines from the same run.

A guest writing at ``--rate`` pages/s (default: without limit, where pre-copy cannot converge
here) is migrated over loopback to ``migrator receive --prepare`` in its own process, as in
``bench_migrate.py``, in three modes, each on a fresh guest:

- ``precopy``: pre-copy with auto-converge (today's answer to a guest that outruns the link);
- ``hybrid``: ``--postcopy-after auto``, pre-copy until it stalls, then post-copy;
- ``postcopy``: ``--postcopy``, switch right after round 0's scan.

Baselines, measured first: ``push`` (the region sent once through the same transport, as in
``bench_migrate.py``) and the guest's own writes/s before any migration. Each mode prints its
round table, downtime and its parts, total time, the post-copy phase (pages faulted versus
pushed, fault latency p50/p99/max from the destination) and the guest's writes/s during
post-copy against before the switch.

    .venv/bin/python scripts/bench_postcopy.py --size 1G [--rate 200000] [--modes hybrid,postcopy] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import trio

from bench_migrate import PS, Receiver, migrate, push_once
from harness.bench import finish, goal
from migrator.cli.render import format_round_table, format_summary
from migrator.guest.layout import parse_size
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings
from migrator.tracker.memory import ProcessMemory

MODES = {
    "precopy": {},
    "hybrid": {"postcopy_auto": True},
    "postcopy": {"postcopy_after": 0},
}
WARM_S = 1.0     # the guest writes this long before it is measured or migrated


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rate", default="unlimited", help="guest page writes per second, or unlimited")
    ap.add_argument("--fill", default="random", choices=("random", "text", "sparse"))
    ap.add_argument("--downtime-ms", type=float, default=10.0)
    ap.add_argument("--compress", default="none")
    ap.add_argument("--modes", default="precopy,hybrid,postcopy")
    ap.add_argument("--json", metavar="PATH", help="write results here ('-' for stdout)")
    args = ap.parse_args()
    size = parse_size(args.size)
    rate = None if args.rate == "unlimited" else float(args.rate)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")
    work = tempfile.mkdtemp(prefix="bench-postcopy-")
    settings = MigrateSettings(downtime_ms=args.downtime_ms, compress=args.compress)
    out: dict = {"size": size, "rate": rate, "settings": vars(args)}

    def new_guest(name: str):
        guest = spawn_guest(os.path.join(work, name), size=size, dirty_rate=rate, fill=args.fill)
        time.sleep(WARM_S)
        return guest

    # --- baselines --------------------------------------------------------------------------------
    with new_guest("base.sock") as guest:
        client = guest.client()
        before = client.stats()["steps"]
        t = time.perf_counter()
        time.sleep(1.0)
        guest_rate = (client.stats()["steps"] - before) / (time.perf_counter() - t)
        region = client.attach("none").layout.regions[0]
        buffer = bytearray(region.length)
        ProcessMemory(guest.pid).read_runs([(region.start, region.length // PS)], buffer)
        push_s, _ = min(trio.run(push_once, buffer, region.start, settings) for _ in range(2))
        del buffer
    print(f"baseline push once:   {push_s * 1000:8.1f} ms ({size / push_s / 1e6:.0f} MB/s, {args.compress})")
    print(f"baseline guest rate:  {guest_rate:10.0f} writes/s (--rate {args.rate})")
    out["baselines"] = {"push_s": push_s, "guest_writes_per_s": guest_rate}

    reports, dests = {}, {}
    for mode in modes:
        with new_guest(f"{mode}.sock") as guest:
            receiver = Receiver(work, mode, size, memfd=False, prepare=True)
            s = MigrateSettings(**{**settings.__dict__, **MODES[mode]})
            reports[mode], dests[mode], _ = migrate(guest, s, receiver)
        report = reports[mode]
        print(f"\n--- {mode}")
        print(format_round_table(report))
        print(format_summary(report))
        pc = report.get("postcopy")
        if pc:
            print(f"post-copy  {pc['stale_pages']} stale pages: {pc['requested_pages']} requested "
                  f"({pc['faults']} faults), {pc['pushed_pages']} pushed, in {pc['duration_s']} s; fault latency "
                  f"p50 {pc['fault_p50_ms']} / p99 {pc['fault_p99_ms']} / max {pc['fault_max_ms']} ms; guest "
                  f"{pc['guest_rate_before']} writes/s before, {pc['guest_rate_after']} during")
    out["reports"], out["destination_reports"] = reports, dests

    goals = []
    if "hybrid" in reports:
        r = reports["hybrid"]
        ok = r["result"] == "committed" and r["verified"]
        goals += [
            goal("hybrid verified", ok, True, True, ok, rule=r["rule"]),
            goal("hybrid downtime_ms", r["downtime_ms"], None, 10.0, ok and r["downtime_ms"] <= 10.0),
            goal("hybrid total_s / push_s", r["total_s"] / push_s, push_s, 1.3, ok and r["total_s"] <= 1.3 * push_s),
        ]
    for mode in ("hybrid", "postcopy"):
        pc = (reports.get(mode) or {}).get("postcopy")
        if not pc:
            continue
        p99 = pc["fault_p99_ms"]
        goals.append(goal(f"{mode} fault p99 ms", p99, pc["fault_p50_ms"], 1.0, p99 is not None and p99 <= 1.0,
                          faults=pc["faults"]))
        before, after = pc["guest_rate_before"] or guest_rate, pc["guest_rate_after"]
        goals.append(goal(f"{mode} guest writes/s during post-copy / before", None if after is None else after / before,
                          before, 0.5, after is not None and after >= 0.5 * before))
    out["comparison"] = {
        mode: {"downtime_ms": r["downtime_ms"], "total_s": r["total_s"], "total_over_push": r["total_s"] / push_s,
               "throttle_max": max((x["throttle"] for x in r["rounds"]), default=0.0), "rule": r["rule"],
               "pages_sent": r["pages_sent"], "bytes_wire": r["bytes_wire"]}
        for mode, r in reports.items()
    }
    print("\nmode        downtime ms   total s   total/push   max throttle   rule")
    for mode, c in out["comparison"].items():
        print(f"{mode:10} {c['downtime_ms'] or 0:12.1f} {c['total_s']:9.2f} {c['total_over_push']:12.2f} "
              f"{c['throttle_max']:14.0%}   {c['rule']}")
    out["goals"] = goals
    return finish(out, goals, args.json)


if __name__ == "__main__":
    sys.exit(main())
