"""Benchmark: live migration of a guest over loopback against baselines from the same run.

The destination runs as it does in use: ``migrator receive`` in its own process, started before
the migration with ``--prepare SIZE``, so its restore guest is started and its memory faulted in
ahead, as QEMU's destination is started with ``-incoming`` and ``-mem-prealloc``. (``--cold``
starts the restore guest when the migration arrives: on this VM fresh memory costs 0.4-2.5 s of
CPU per GiB, which then competes with round 0.)

Baselines, measured first on the same guest and machine:
- push: the region's bytes sent once through the same transport (same compression, streams) to
  a receiver in another process that decodes every frame and applies nothing: the floor for the
  total migration time, and what round 0's throughput is compared with;
- stop-and-copy: SIGSTOP, process_vm_readv of the whole region, SIGCONT: the downtime that
  pre-copy must beat;
- hash: the region digest (migrator.core.digest, on every core) of the region in memory: what
  ``--verify full`` may add to the downtime. Shown too: ``read+hash``, the same digest with the
  pieces read across processes, which is what hashing a private guest's region costs the
  migrator.

Then one migration with ``--verify pages`` and one with ``--verify full`` (fresh guests), and the
cost per page of each stage (scan, read, encode, send, the destination's apply) for round 0 and
for the scattered rounds after it. The issue's cases: ``--size 1G --rate 20000 --downtime-ms 10``,
``--rate 200000 --downtime-ms 50``, ``--size 4G --downtime-ms 50`` (with ``--compress none``
``--fill random`` every page costs its 4 KiB on the wire).

    .venv/bin/python scripts/bench_migrate.py --size 1G --rate 20000 [--memfd] [--private] [--cold] [--bandwidth 1G] [--json out.json]

Uncapped, everything (the guest, both ends, both transports) shares this machine's CPUs and the
migration's extra work (reading the guest, writing the restore guest, page digests) competes
with the transport; the CPU seconds each side spent are printed with each run. With
``--bandwidth`` the link is the bottleneck, as between two hosts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import trio

from migrator import protocol as p
from migrator.core.digest import region_digest, region_digest_read
from migrator.guest.client import GuestClient
from migrator.guest.layout import parse_size
from migrator.guest.spawn import spawn_guest
from migrator.core.model import Region
from migrator.cli.render import format_round_table, format_summary
from migrator.core.runs import split_runs
from migrator.core.tokens import load_default_token
from migrator.core.units import parse_rate
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.source.pages import BATCH_PAGES, MAX_RUNS_PER_EVENT
from harness.bench import finish, goal
from migrator.tracker.memory import ProcessMemory
from migrator.transport import connect, serve

PS = 4096


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (all threads), or of its reaped children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# --- baseline: push the region once ------------------------------------------------------------


async def push_once(data: bytearray, region_start: int, settings: MigrateSettings) -> tuple[float, dict]:
    """Seconds to send ``data`` as Pages, as the engine batches them, to a receiver in another
    process (``--_sink``) that decodes every frame, until it acknowledges the RoundEnd; and the
    CPU seconds each side spent on the whole session."""
    cpu = {"sender": -cpu_seconds(), "receiver": -cpu_seconds(resource.RUSAGE_CHILDREN)}
    sink = subprocess.Popen([sys.executable, __file__, "--_sink"], stdout=subprocess.PIPE, text=True)
    try:
        address = sink.stdout.readline().strip()
        channel = await connect(address, token=None, compress=settings.compress, streams=settings.streams,
                                bandwidth=settings.bandwidth)
        view = memoryview(data)
        await channel.send(p.Layout(regions=(Region(region_start, len(data)),), page_size=PS, meta={}))
        started = time.perf_counter()
        offset = 0
        for batch in split_runs([(region_start, len(data) // PS)], BATCH_PAGES, MAX_RUNS_PER_EVENT):
            size = sum(n for _, n in batch) * PS
            await channel.send(p.Pages(round=0, runs=tuple(batch), payload=view[offset : offset + size]))
            offset += size
        await channel.send(p.RoundEnd(round=0, pages=len(data) // PS))
        await channel.flush()
        ack = await channel.receive()
        seconds = time.perf_counter() - started
        if not (isinstance(ack, p.Ack) and ack.of is p.Acked.ROUND):
            raise RuntimeError(f"the sink answered {ack!r}")
        await channel.send(p.Abort(reason="benchmark done"))
        await channel.flush()
        await channel.aclose()
    finally:
        sink.wait(timeout=30)
    cpu["sender"] += cpu_seconds()
    cpu["receiver"] += cpu_seconds(resource.RUSAGE_CHILDREN)
    return seconds, cpu


def run_sink() -> None:
    """One session: decode every frame, acknowledge the RoundEnd, end at the Abort."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def sink(channel) -> None:
                while not isinstance(event := await channel.receive(), (p.Abort, p.ConnectionClosed)):
                    if isinstance(event, p.RoundEnd):
                        await channel.send(p.Ack(of=p.Acked.ROUND, ok=True, round=event.round))
                        await channel.flush()
                nursery.cancel_scope.cancel()

            print(await nursery.start(functools.partial(serve, "127.0.0.1:0", sink, token=None)), flush=True)

    trio.run(main)


# --- the destination ----------------------------------------------------------------------------


class Receiver:
    """``migrator receive --once`` in its own process, started as an operator would: sources
    prove this user's default token, which it makes if there is none (``token``)."""

    def __init__(self, work: str, name: str, size: int, *, memfd: bool, prepare: bool) -> None:
        self.report_path = os.path.join(work, f"{name}-dest.json")
        argv = [sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0", "--once",
                "--control-dir", work, "--report", self.report_path]
        argv += [] if memfd else ["--private"]
        argv += ["--prepare", str(size)] if prepare else []
        self.popen = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        self.address = self._line("listening on").rsplit(" ", 1)[-1]
        self.token = load_default_token()
        self.prepared = self._line("prepared") if prepare else None

    def _line(self, marker: str) -> str:
        for line in self.popen.stderr:
            if marker in line:
                return line.strip()
        raise RuntimeError(f"migrator receive exited (status {self.popen.wait()}) before saying {marker!r}")

    def finish(self) -> dict:
        """Wait for the receiver to exit, quit the guest it resumed, return its report."""
        log = self.popen.stderr.read()
        before = cpu_seconds(resource.RUSAGE_CHILDREN)
        if self.popen.wait(timeout=60):
            print(f"migrator receive failed:\n{log}", file=sys.stderr)
        self.cpu_s = cpu_seconds(resource.RUSAGE_CHILDREN) - before
        with open(self.report_path) as f:
            report = json.load(f)
        if report.get("result") == "resumed":
            GuestClient(report["guest_control"]).quit()
        return report



def migrate(guest, settings: MigrateSettings, receiver: Receiver) -> tuple[dict, dict, dict]:
    """The source's and the destination's reports, and the CPU seconds each process spent."""
    started = cpu_seconds()
    try:
        report = trio.run(SourceMigration(guest.control, receiver.address, replace(settings, token=receiver.token)).run).to_dict()
    finally:
        source_cpu = cpu_seconds() - started
        dest = receiver.finish()
    return report, dest, {"source": source_cpu, "destination": receiver.cpu_s}


def read_and_hash_ms(memory: ProcessMemory, region: Region) -> float:
    """One pass over a private guest's region as the migrator makes it: the region digest, its
    pieces read across processes a chunk at a time and hashed, on every core."""

    def read(offset: int, view: memoryview) -> None:
        memory.read_runs([(region.start + offset, len(view) // PS)], view)

    started = time.perf_counter()
    region_digest_read(region.length, read)
    return (time.perf_counter() - started) * 1000


STAGES = ("scan", "read", "encode", "send", "apply", "total")


def stage_costs(report: dict, dest: dict) -> dict[str, dict[str, float | None]]:
    """Microseconds per page of each stage, for round 0 and for the later (scattered) rounds:
    the source's scan, read (with its page hashes), encode (compression, MACs) and send (until
    the destination acknowledged the round: its receive and apply included), the destination's
    apply (writing and hashing, over every page it applied) and each group's end-to-end total."""
    applied = dest.get("pages_applied") or 0
    apply_us = dest["apply_s"] / applied * 1e6 if applied else None

    def per_page(rows: list[dict]) -> dict[str, float | None]:
        pages = sum(r["dirty_pages"] - r["zero_pages"] for r in rows)
        if not pages:
            return dict.fromkeys(STAGES)
        us = lambda key: sum(r[key] for r in rows) / pages * 1e6   # noqa: E731
        return {"scan": us("scan_s"), "read": us("read_s"), "encode": us("compress_s"), "send": us("send_s"),
                "apply": apply_us, "total": sum(r["duration_s"] - r["scan_s"] for r in rows) / pages * 1e6}

    rounds = report["rounds"]
    return {"round 0": per_page(rounds[:1]), "scattered": per_page(rounds[1:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rate", type=float, default=20000, help="guest page writes per second")
    ap.add_argument("--fill", default="random", choices=("random", "text", "sparse"))
    ap.add_argument("--downtime-ms", type=float, default=50.0)
    ap.add_argument("--compress", default="zstd:1")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--bandwidth", type=parse_rate, default=None, metavar="RATE",
                    help="cap the transport (push and migrations alike), e.g. 1G bytes/s or 1gbit")
    ap.add_argument("--memfd", action="store_true", help="the source guest on a shared memfd (the migrator maps it)")
    ap.add_argument("--private", action="store_true",
                    help="restore guests on private memory (receive --private), not the receiver's default memfd")
    ap.add_argument("--cold", action="store_true", help="start the restore guest when the migration arrives")
    ap.add_argument("--json", metavar="PATH", help="write results here ('-' for stdout)")
    ap.add_argument("--_sink", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._sink:
        run_sink()
        return 0
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="bench-migrate-")
    settings = MigrateSettings(downtime_ms=args.downtime_ms, compress=args.compress, streams=args.streams,
                               bandwidth=args.bandwidth)
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
        memory.read_runs([(region.start, region.length // PS)], buffer)  # touch the buffer once
        downs = []
        for _ in range(3):
            t = time.perf_counter()
            os.kill(guest.pid, signal.SIGSTOP)
            memory.read_runs([(region.start, region.length // PS)], buffer)
            os.kill(guest.pid, signal.SIGCONT)
            downs.append((time.perf_counter() - t) * 1000)
        stop_copy_ms = sorted(downs)[1]
        t = time.perf_counter()
        region_digest(buffer)
        hash_ms = (time.perf_counter() - t) * 1000
        read_hash_ms = min(read_and_hash_ms(memory, region) for _ in range(2))
        push_s, push_cpu = min(trio.run(push_once, buffer, region.start, settings) for _ in range(2))
        del buffer
    push_bw = size / push_s
    cap = f", capped at {args.bandwidth / 1e6:.0f} MB/s" if args.bandwidth else ""
    print(f"baseline push once:     {push_s * 1000:8.1f} ms  ({push_bw / 1e6:.0f} MB/s, {args.compress}, "
          f"{args.streams} stream(s){cap}, receiver in another process; CPU s: sender {push_cpu['sender']:.2f}, "
          f"receiver {push_cpu['receiver']:.2f})")
    print(f"baseline stop-and-copy: {stop_copy_ms:8.1f} ms downtime")
    print(f"baseline region hash:   {hash_ms:8.1f} ms in memory, {read_hash_ms:.1f} ms read across processes + hash")
    out["baselines"] = {"push_s": push_s, "push_bandwidth": push_bw, "stop_and_copy_ms": stop_copy_ms,
                        "hash_ms": hash_ms, "read_hash_ms": read_hash_ms,
                        "push_cpu_s": push_cpu}

    # --- migrations -----------------------------------------------------------------------------
    reports, dests, cpus = {}, {}, {}
    for verify in ("pages", "full"):
        with new_guest(f"src-{verify}.sock") as guest:
            receiver = Receiver(work, verify, size, memfd=not args.private, prepare=not args.cold)
            s = MigrateSettings(**{**settings.__dict__, "verify": verify})
            reports[verify], dests[verify], cpus[verify] = migrate(guest, s, receiver)
        print(f"\n--verify {verify}" + (f" ({receiver.prepared.split(': ', 1)[-1]})" if receiver.prepared else " (cold)"))
        print(format_round_table(reports[verify]))
        print(format_summary(reports[verify]))
        print(f"cpu       source {cpus[verify]['source']:.2f} s, destination {cpus[verify]['destination']:.2f} s "
              f"(wall {reports[verify]['total_s']:.2f} s, {os.cpu_count()} CPUs)")
    out["reports"], out["destination_reports"], out["cpu_s"] = reports, dests, cpus

    pages_r, full_r = reports["pages"], reports["full"]
    r0 = pages_r["rounds"][0]
    r0_bw = r0["bytes_raw"] / max(r0["duration_s"] - r0["scan_s"], 1e-9)
    stages = stage_costs(pages_r, dests["pages"])
    print("\ncost per page, us (--verify pages; send includes the destination's receive and apply until its Ack)")
    print(f"{'':10}" + "".join(f"{name:>10}" for name in STAGES))
    for kind, row in stages.items():
        print(f"{kind:10}" + "".join(f"{row[name]:10.2f}" if row[name] is not None else f"{'-':>10}" for name in STAGES))
    out["stage_us_per_page"] = stages
    scattered = stages["scattered"]["total"]
    throttle = max((r["throttle"] for r in pages_r["rounds"]), default=0.0)
    goals = [
        goal("verified (--verify pages)", pages_r["verified"], True, True, pages_r["verified"]),
        goal("downtime_ms (--verify pages)", pages_r["downtime_ms"], stop_copy_ms, args.downtime_ms,
             pages_r["verified"] and pages_r["downtime_ms"] <= args.downtime_ms),
        goal("downtime_ms (--verify full)", full_r["downtime_ms"], stop_copy_ms, args.downtime_ms + hash_ms,
             full_r["verified"] and full_r["downtime_ms"] <= args.downtime_ms + hash_ms, read_hash_ms=read_hash_ms),
        goal("total_s / push_s", pages_r["total_s"] / push_s, push_s, 1.5, pages_r["total_s"] <= 1.5 * push_s),
        goal("round0 bandwidth / push bandwidth", r0_bw / push_bw, push_bw, 0.8, r0_bw >= 0.8 * push_bw),
        goal("scattered pages, us per page end to end", scattered, push_s / (size / PS) * 1e6, 3.0,
             scattered is not None and scattered <= 3.0),
        goal("no throttling (max duty)", throttle, 0.0, 0.0, throttle == 0.0, rounds=len(pages_r["rounds"]),
             rule=pages_r["rule"]),
    ]
    out["goals"] = goals
    return finish(out, goals, args.json)


if __name__ == "__main__":
    sys.exit(main())
