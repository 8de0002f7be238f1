"""Benchmark: live migration between two "hosts" (network namespaces joined by a shaped veth link).

Host a runs the guest and ``migrator migrate``; host b runs ``migrator receive --once --prepare SIZE``
(``--cold``: without ``--prepare``). The link
is shaped with tc tbf (``--rate``); with ``--delay-ms``/``--jitter-ms`` a fault proxy in host b
adds latency (this kernel has no netem). Baseline, measured first over the same link and proxy:
plain TCP pushing up to 256 MiB from a to b, which gives the link's throughput and the time to
push the whole region once (= a stop-and-copy's downtime over this link). Then the migration,
its round table and summary, a check of the resumed destination guest (steps advance, self-check
clean), and the goals. Everything is torn down at the end, also on Ctrl-C, SIGTERM or an error.

    sudo .venv/bin/python scripts/two_hosts.py                     # 1 GiB over 1 Gbit/s, 2 ms delay
    sudo .venv/bin/python scripts/two_hosts.py --size 64M --json out.json
    sudo .venv/bin/python scripts/two_hosts.py --size 256M --rate 200mbit --jitter-ms 5 --corrupt-at 5000000

Needs root (network namespaces, veth, tc) and the kernel features ``migrator probe`` lists.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import time

import trio

from migrator.guest.client import GuestClient
from migrator.guest.layout import PAGE_SIZE, parse_size
from harness import netns
from migrator.core.failures import expected_cause
from harness.bench import finish, goal
from harness.faultproxy import FaultProxy, Faults
from harness.hosts import (
    spawn_guest_in, start_migrate, start_receiver, steps_advance, write_certificate,
)
from migrator.tracker import TRACKERS

BASELINE_MAX = 256 << 20      # bytes pushed for the link baseline (enough for a steady rate)
PUSH_CHUNK = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="guest region size (default 1G)")
    ap.add_argument("--cold", action="store_true",
                    help="start the restore guest when the migration arrives (default: receive --prepare SIZE)")
    ap.add_argument("--rate", default="1gbit", help="link rate, tc syntax, or 'none' (default 1gbit)")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="one-way delay added by the proxy (default 2)")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="extra per-chunk delay, uniform in [0, J] (default 0)")
    ap.add_argument("--corrupt-at", type=int, metavar="BYTE", help="proxy: flip a bit of the stream's byte at this offset")
    ap.add_argument("--cut-at", type=int, metavar="BYTE", help="proxy: reset the connection after this many bytes")
    ap.add_argument("--stall-at", type=int, metavar="BYTE", help="proxy: stop forwarding after this many bytes")
    ap.add_argument("--dirty-rate", type=float, help="guest page writes per second (default: 1%% of its pages)")
    ap.add_argument("--fill", default="random", choices=("random", "text", "sparse"))
    ap.add_argument("--downtime-ms", type=float, default=50.0)
    ap.add_argument("--tracker", choices=TRACKERS, default="wp-async")
    ap.add_argument("--compress", default="zstd:1")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--verify", choices=("pages", "full"), default="pages")
    ap.add_argument("--tls", action="store_true", help="encrypt the migration with TLS (a throwaway certificate; needs openssl)")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up on the migration after this many seconds")
    ap.add_argument("--json", metavar="PATH", help="write results here ('-' for stdout)")
    return ap.parse_args(argv)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def push_baseline(bed: netns.Testbed, faults: Faults | None, nbytes: int) -> float:
    """Seconds to push ``nbytes`` from host a to a sink in host b over the link (and proxy)."""
    received = 0
    done = trio.Event()

    async def sink(stream) -> None:
        nonlocal received
        async with stream:
            while data := await stream.receive_some(PUSH_CHUNK):
                received += len(data)
        done.set()

    async with trio.open_nursery() as nursery:
        listener = netns.open_tcp_listener(bed.b.address, 0, netns=bed.b.netns)
        nursery.start_soon(trio.serve_listeners, sink, [listener])
        host, port = bed.b.address, listener.socket.getsockname()[1]
        if faults is not None:
            proxy = FaultProxy(host, port, faults, listen=(bed.b.address, 0), netns=bed.b.netns)
            await nursery.start(proxy.serve)
            host, port = proxy.address.rsplit(":", 1)
        stream = await netns.open_tcp_stream(host, int(port), netns=bed.a.netns)
        chunk = bytes(PUSH_CHUNK)
        started = trio.current_time()
        async with stream:
            for _ in range(nbytes // PUSH_CHUNK):
                await stream.send_all(chunk)
            await stream.send_eof()
            await done.wait()
        seconds = trio.current_time() - started
        nursery.cancel_scope.cancel()
    if received != nbytes // PUSH_CHUNK * PUSH_CHUNK:
        raise RuntimeError(f"baseline push: {received} of {nbytes} bytes arrived")
    return seconds


async def watch_signals() -> None:
    """SIGTERM and SIGHUP end the run like Ctrl-C does (teardown included)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for _ in signals:
            raise KeyboardInterrupt


def check_destination(control: str) -> dict:
    """The resumed destination guest: steps advance and the deep self-check is clean; then quit."""
    before, after = steps_advance(control, within=5.0)
    with GuestClient(control, timeout=60.0) as client:
        check = client.check(deep=True)
        client.quit()
    return {"steps_before": before, "steps_after": after, "check": check}


async def run(args: argparse.Namespace, bed: netns.Testbed, workdir: str) -> dict:
    size = parse_size(args.size)
    link = Faults(delay_s=args.delay_ms / 1000, jitter_s=args.jitter_ms / 1000)
    stream = Faults(delay_s=link.delay_s, jitter_s=link.jitter_s, corrupt_at=args.corrupt_at, cut_at=args.cut_at,
                    stall_at=args.stall_at)
    if stream == Faults():
        link = stream = None       # no proxy at all: straight over the veth link
    out: dict = {"settings": vars(args), "size": size, "link": {"a": vars(bed.a), "b": vars(bed.b)}}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)

        # --- baseline: the link itself --------------------------------------------------------
        pushed = min(size, BASELINE_MAX)
        push_s = await push_baseline(bed, link, pushed)
        throughput = pushed / push_s
        push_all_s = size / throughput
        log(f"baseline link push:   {pushed >> 20} MiB in {push_s:.2f} s = {throughput * 8 / 1e6:.0f} Mbit/s "
            f"(rate {args.rate}, delay {args.delay_ms:g} ms, jitter {args.jitter_ms:g} ms)")
        log(f"baseline region once: {push_all_s * 1000:.0f} ms (stop-and-copy downtime over this link)")
        out["baseline"] = {"pushed_bytes": pushed, "push_s": push_s, "throughput": throughput, "push_all_s": push_all_s}

        # --- the migration --------------------------------------------------------------------
        # no token options: the receiver uses (and makes if needed) this user's default token file,
        # which migrate finds there too, the namespaces sharing one file system
        tls_receive, tls_migrate = [], []
        if args.tls:
            cert, key = write_certificate(workdir, bed.b.address)
            tls_receive, tls_migrate = ["--tls-cert", cert, "--tls-key", key], ["--tls-ca", cert]
        receiver = await start_receiver(nursery, bed, workdir, token_file=None, once=True,
                                        extra=([] if args.cold else ["--prepare", str(size)]) + tls_receive,
                                        echo=lambda line: log(f"[b] {line}"))
        if not args.cold:
            await receiver.stderr.wait_for("prepared", timeout=120)
        to = receiver.address
        if stream is not None:
            host, port = receiver.address.rsplit(":", 1)
            proxy = FaultProxy(host, int(port), stream, listen=(bed.b.address, 0), netns=bed.b.netns)
            await nursery.start(proxy.serve)
            to = proxy.address
        rate = args.dirty_rate if args.dirty_rate is not None else size // PAGE_SIZE / 100
        control = os.path.join(workdir, "src.sock")
        log(f"starting a {size >> 20} MiB guest writing {rate:.0f} pages/s in host a")
        guest = await trio.to_thread.run_sync(functools.partial(
            spawn_guest_in, bed.a.netns, control, size=size, dirty_rate=rate, fill=args.fill,
            extra_args=["--exit-with-parent"],
        ))
        try:
            report_path = os.path.join(workdir, "run.json")
            migrate = await start_migrate(
                nursery, bed, control, to, token_file=None, report=report_path, stdout=None,
                extra=["--downtime-ms", str(args.downtime_ms), "--tracker", args.tracker, "--compress", args.compress,
                       "--streams", str(args.streams), "--verify", args.verify, *tls_migrate],
                echo=lambda line: log(f"[a] {line}"),
            )
            started = time.perf_counter()
            status = await migrate.wait(args.timeout)
            out["wall_s"] = time.perf_counter() - started
            out["migrate_status"] = status
            out["receive_status"] = await receiver.wait(60)
        finally:
            await trio.to_thread.run_sync(guest.kill)
        nursery.cancel_scope.cancel()
    out["report"] = _load(report_path)
    out["dest_report"] = _load(receiver.report)
    dest = out["dest_report"] or {}
    if dest.get("result") == "resumed":
        out["destination"] = await trio.to_thread.run_sync(check_destination, dest["guest_control"])
    return out


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def goals(args: argparse.Namespace, out: dict) -> list[dict]:
    report = out["report"] or {}
    base = out["baseline"]
    verified = bool(
        out["migrate_status"] == 0 and report.get("verified") and out.get("destination", {}).get("check", {}).get("clean")
    )
    downtime = report.get("downtime_ms")
    total = report.get("total_s")
    rounds = report.get("rounds") or []
    r0 = rounds[0] if rounds else None
    r0_rate = r0["bytes_wire"] / max(r0["duration_s"] - r0["scan_s"], 1e-9) if r0 else None
    return [
        goal("converged and verified (destination resumed, self-check clean)", verified, True, True, verified),
        goal("downtime_ms", downtime, base["push_all_s"] * 1000, args.downtime_ms,
             verified and downtime is not None and downtime <= args.downtime_ms),
        goal("total_s / link push of the region", total / base["push_all_s"] if total else None, base["push_all_s"], 1.5,
             verified and total is not None and total <= 1.5 * base["push_all_s"]),
        goal("round-0 wire throughput / link throughput", r0_rate / base["throughput"] if r0_rate else None,
             base["throughput"], 0.7, r0_rate is not None and r0_rate >= 0.7 * base["throughput"]),
    ]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = netns.unavailable()
    if reason is not None:
        log(f"two_hosts: cannot build the testbed: {reason}")
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):     # outside trio.run; inside, watch_signals
        signal.signal(sig, _interrupt)
    rate = None if args.rate == "none" else args.rate
    workdir = tempfile.mkdtemp(prefix="two-hosts-", dir="/tmp")   # short: unix socket paths
    bed = None
    try:
        bed = netns.Testbed(rate=rate)
        log(f"hosts: a = {bed.a.netns} {bed.a.dev} {bed.a.address}, b = {bed.b.netns} {bed.b.dev} {bed.b.address}")
        out = trio.run(run, args, bed, workdir)
    except BaseException as exc:
        if not isinstance(expected_cause(exc), KeyboardInterrupt):
            raise
        out = None
    finally:
        if bed is not None:
            bed.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if out is None:
        log("two_hosts: interrupted; testbed torn down")
        return 130
    if out["report"] is None or out["report"].get("error"):
        error = (out["report"] or {}).get("error", "no report")
        log(f"two_hosts: migration failed (status {out['migrate_status']}): {error}")
    out["goals"] = items = goals(args, out)
    return finish(out, items, args.json)


if __name__ == "__main__":
    sys.exit(main())
