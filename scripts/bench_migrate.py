"""Benchmark: live migration of a guest over loopback against baselines from the same run.

Baselines, measured first on the same guest and machine:
- push: the region's bytes sent once through the same transport (same compression, streams)
  to a receiver that applies nothing: the floor for the total migration time;
- stop-and-copy: SIGSTOP, process_vm_readv of the whole region, SIGCONT: the downtime that
  pre-copy must beat;
- hash: xxh3-128 over the whole region: what ``--verify full`` adds to the downtime.

Then one migration with ``--verify pages`` and one with ``--verify full`` (fresh guests).

    .venv/bin/python scripts/bench_migrate.py --size 1G --rate 20000 [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import tempfile
import time

import trio
import xxhash

from migrator import protocol as p
from migrator.destination.engine import DestinationMigration, ReceiveSettings
from migrator.errors import MigrationFailed
from migrator.guest.layout import parse_size
from migrator.guest.spawn import spawn_guest
from migrator.model import Region
from migrator.report import format_round_table, format_summary
from migrator.runs import split_runs
from migrator.source.engine import BATCH_PAGES, MAX_RUNS_PER_EVENT, MigrateSettings, SourceMigration
from migrator.tracker.memory import ProcessMemory
from migrator.testing.bench import finish, goal
from migrator.transport import connect, serve


async def push_once(data: bytearray, region_start: int, settings: MigrateSettings) -> float:
    """Seconds to send ``data`` as Pages through a fresh channel to a discarding receiver."""
    done = trio.Event()

    async def sink(channel) -> None:
        while not isinstance(await channel.receive(), p.Abort):
            pass
        done.set()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(functools.partial(serve, "127.0.0.1:0", sink, token=None))
        channel = await connect(address, token=None, compress=settings.compress, streams=settings.streams)
        view = memoryview(data)
        pages = len(data) // 4096
        await channel.send(p.Layout(regions=(Region(region_start, len(data)),), page_size=4096, meta={}))
        t = time.perf_counter()
        offset = 0
        for batch in split_runs([(region_start, pages)], BATCH_PAGES, MAX_RUNS_PER_EVENT):
            size = sum(n for _, n in batch) * 4096
            await channel.send(p.Pages(round=0, runs=tuple(batch), payload=view[offset : offset + size]))
            offset += size
        await channel.send(p.RoundEnd(round=0, stats={}))
        await channel.flush()
        seconds = time.perf_counter() - t
        await channel.send(p.Abort(reason="benchmark done"))
        await channel.flush()
        await done.wait()
        await channel.aclose()
        nursery.cancel_scope.cancel()
    return seconds


async def migrate(guest, settings: MigrateSettings, control_dir: str, memfd: bool) -> dict:
    async with trio.open_nursery() as nursery:

        async def handle(channel) -> None:
            migration = DestinationMigration(channel, ReceiveSettings(control_dir=control_dir, memfd=memfd), log=lambda _: None)
            try:
                report = await migration.run()
            except MigrationFailed:
                return
            from migrator.guest.client import GuestClient

            GuestClient(report["guest_control"]).quit()

        address = await nursery.start(functools.partial(serve, "127.0.0.1:0", handle, token=None))
        report = await SourceMigration(guest.control, address, settings).run()
        nursery.cancel_scope.cancel()
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rate", type=float, default=20000, help="guest page writes per second")
    ap.add_argument("--fill", default="random", choices=("random", "text", "sparse"))
    ap.add_argument("--downtime-ms", type=float, default=50.0)
    ap.add_argument("--compress", default="zstd:1")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--memfd", action="store_true", help="guests on a shared memfd (the migrator maps it)")
    ap.add_argument("--json", metavar="PATH", help="write results here ('-' for stdout)")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="bench-migrate-")
    settings = MigrateSettings(downtime_ms=args.downtime_ms, compress=args.compress, streams=args.streams)
    out: dict = {"size": size, "rate": args.rate, "fill": args.fill, "settings": vars(args)}

    def new_guest(name: str):
        g = spawn_guest(os.path.join(work, name), size=size, dirty_rate=args.rate, fill=args.fill, memfd=args.memfd)
        time.sleep(0.5)
        return g

    # --- baselines ------------------------------------------------------------------------------
    with new_guest("base.sock") as guest:
        attachment = guest.client().attach("none")
        region = attachment.layout.regions[0]
        memory = ProcessMemory(guest.pid)
        buffer = bytearray(region.length)
        memory.read_runs([(region.start, region.length // 4096)], buffer)  # touch the buffer once
        downs = []
        for _ in range(3):
            t = time.perf_counter()
            os.kill(guest.pid, signal.SIGSTOP)
            memory.read_runs([(region.start, region.length // 4096)], buffer)
            os.kill(guest.pid, signal.SIGCONT)
            downs.append((time.perf_counter() - t) * 1000)
        stop_copy_ms = sorted(downs)[1]
        t = time.perf_counter()
        xxhash.xxh3_128_hexdigest(buffer)
        hash_ms = (time.perf_counter() - t) * 1000
        push_s = min(trio.run(push_once, buffer, region.start, settings) for _ in range(2))
        del buffer
    push_bw = size / push_s
    print(f"baseline push once:     {push_s * 1000:8.1f} ms  ({push_bw / 1e6:.0f} MB/s, {args.compress}, {args.streams} stream(s))")
    print(f"baseline stop-and-copy: {stop_copy_ms:8.1f} ms downtime")
    print(f"baseline region hash:   {hash_ms:8.1f} ms")
    out["baselines"] = {"push_s": push_s, "push_bandwidth": push_bw, "stop_and_copy_ms": stop_copy_ms, "hash_ms": hash_ms}

    # --- migrations ---------------------------------------------------------------------------
    reports = {}
    for verify in ("pages", "full"):
        with new_guest(f"src-{verify}.sock") as guest:
            s = MigrateSettings(**{**settings.__dict__, "verify": verify})
            report = trio.run(migrate, guest, s, work, args.memfd)
        reports[verify] = report
        print(f"\n--verify {verify}")
        print(format_round_table(report))
        print(format_summary(report))
    out["reports"] = reports

    pages_r, full_r = reports["pages"], reports["full"]
    r0 = pages_r["rounds"][0]
    r0_bw = r0["bytes_raw"] / max(r0["duration_s"] - r0["scan_s"], 1e-9)
    goals = [
        goal("verified (--verify pages)", pages_r["verified"], True, True, pages_r["verified"]),
        goal("downtime_ms (--verify pages)", pages_r["downtime_ms"], stop_copy_ms, args.downtime_ms,
             pages_r["verified"] and pages_r["downtime_ms"] <= args.downtime_ms),
        goal("downtime_ms (--verify full)", full_r["downtime_ms"], stop_copy_ms, args.downtime_ms + hash_ms,
             full_r["verified"] and full_r["downtime_ms"] <= args.downtime_ms + hash_ms),
        goal("total_s / push_s", pages_r["total_s"] / push_s, push_s, 1.5, pages_r["total_s"] <= 1.5 * push_s),
        goal("round0 bandwidth / push bandwidth", r0_bw / push_bw, push_bw, 0.7, r0_bw >= 0.7 * push_bw),
    ]
    out["goals"] = goals
    return finish(out, goals, args.json)


if __name__ == "__main__":
    sys.exit(main())
