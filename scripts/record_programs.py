#!/usr/bin/env python3
"""Record real programs nobody here wrote, predict their migration, and migrate their replay.

For each program (installed from the distribution's packages with apt-get if missing, which
needs root): start it, drive it with a load, attach ``migrator track --pid`` at ``--interval``
for ``--seconds`` with ``--record`` and ``--plot``, stop it. Then, for the traces together:

- ``migrator predict TRACE --bandwidth B --downtime-ms T`` at each bandwidth (the program's own
  tracked memory as round 0, the downtime target alone as the stop rule);
- ``migrator experiment --traces ... --bandwidths ...``: a guest replaying each trace, migrated
  at each cap with the same target, next to the prediction for the replay's settings (its
  region as round 0, the engine's rules, from where the replay was).

Programs:
  redis      redis-server (package redis-server) on a unix socket, no persistence, under
             ``redis-benchmark -t set,get -d 256 -r 100000`` (package redis-tools)
  memcached  memcached -m 64 on a unix socket, under a load of this script's own: pipelined
             sets of 256-byte values to random keys of 100,000, and multi-gets, 1:1

Writes into --out: NAME.trace, NAME.json (track's summary), NAME.png, NAME.predict.json, the
experiment's directory, and summary.md with one table per program.
Usage: scripts/record_programs.py [--programs redis,memcached] [--seconds 6] [--interval 0.1]
                                  [--bandwidths 100M,200M] [--downtime-ms 50] [--max-rounds 15]
                                  [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIGRATOR = (sys.executable, "-m", "migrator")
MB = 1_000_000
KEYS = 100_000
VALUE = 256
PACKAGES = {"redis-server": "redis-server", "redis-benchmark": "redis-tools", "memcached": "memcached"}


def need(*binaries: str) -> None:
    """Install the packages that provide ``binaries`` (apt-get, as root) unless already there."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if not missing:
        return
    packages = sorted({PACKAGES[b] for b in missing})
    if os.geteuid() != 0:
        sys.exit(f"record_programs: {', '.join(missing)} missing; install {' '.join(packages)} (apt-get needs root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages], check=True, env=env,
                   stdout=subprocess.DEVNULL, timeout=600)


def wait_for_socket(path: str, process: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"record_programs: {what} did not open {path}")
        time.sleep(0.05)


class Program:
    """A server under its load generator: ``server`` and ``load`` are their processes."""

    server: subprocess.Popen
    load: subprocess.Popen | None

    @property
    def pid(self) -> int:
        return self.server.pid

    def stop(self) -> None:
        for p in (self.load, self.server):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)


class Redis(Program):
    name = "redis"

    def __init__(self, scratch: str) -> None:
        need("redis-server", "redis-benchmark")
        self.sock = f"{scratch}/redis.sock"
        self.server = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", self.sock, "--save", "",
                                        "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_socket(self.sock, self.server, "redis-server")
        self.version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
        self.load: subprocess.Popen | None = None

    def start_load(self) -> None:
        self.load = subprocess.Popen(["redis-benchmark", "-s", self.sock, "-t", "set,get", "-n", "100000000",
                                      "-r", str(KEYS), "-d", str(VALUE), "-q"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def describe(self) -> str:
        return (f"redis-server {self.version} on a unix socket (no persistence) under "
                f"`redis-benchmark -t set,get -d {VALUE} -r {KEYS}`")


class Memcached(Program):
    name = "memcached"

    def __init__(self, scratch: str) -> None:
        need("memcached")
        self.sock = f"{scratch}/memcached.sock"
        self.server = subprocess.Popen(["memcached", "-m", "64", "-s", self.sock, "-a", "0600", "-u", "root"]
                                       if os.geteuid() == 0 else ["memcached", "-m", "64", "-s", self.sock],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_socket(self.sock, self.server, "memcached")
        self.version = subprocess.run(["memcached", "-V"], capture_output=True, text=True).stdout.split()[-1]
        self.load: subprocess.Popen | None = None

    def start_load(self) -> None:
        self.load = subprocess.Popen([sys.executable, __file__, "--memcached-load", self.sock],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def describe(self) -> str:
        return (f"memcached {self.version} (`-m 64`, unix socket) under pipelined sets of {VALUE}-byte values "
                f"to random keys of {KEYS:,} and multi-gets, 1:1 (this script's `--memcached-load`)")


def memcached_load(path: str, batch: int = 100) -> None:
    """Sets (noreply) and multi-gets of random keys over the text protocol, until killed."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    rng = random.Random(1)
    value = b"x" * VALUE
    pending = b""
    while True:
        keys = [f"key:{rng.randrange(KEYS):06d}".encode() for _ in range(batch)]
        conn.sendall(b"".join(b"set %s 0 0 %d noreply\r\n%s\r\n" % (k, VALUE, value) for k in keys))
        conn.sendall(b"get " + b" ".join(rng.choice(keys) for _ in range(batch)) + b"\r\n")
        while not pending.endswith(b"END\r\n"):
            data = conn.recv(1 << 20)
            if not data:
                return
            pending += data
        pending = b""


def record(program, out: Path, seconds: float, interval: float) -> dict:
    program.start_load()
    time.sleep(1.0)   # the data set exists before the tracking starts
    trace, summary, plot = out / f"{program.name}.trace", out / f"{program.name}.json", out / f"{program.name}.png"
    argv = [*MIGRATOR, "track", "--pid", str(program.pid), "--interval", str(interval), "--duration", str(seconds),
            "--record", str(trace), "--json", str(summary), "--plot", str(plot)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        sys.exit(f"record_programs: track failed for {program.name}: {done.stderr.strip()[-400:]}")
    print(done.stdout.splitlines()[0], file=sys.stderr)
    return json.loads(summary.read_text())


def predict(trace: Path, bandwidth: str, downtime_ms: float) -> dict:
    argv = [*MIGRATOR, "predict", str(trace), "--bandwidth", bandwidth, "--downtime-ms", str(downtime_ms), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        sys.exit(f"record_programs: predict {trace.name} at {bandwidth}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def at_link(row: dict, record: dict, downtime_ms: float, max_rounds: int) -> str:
    """The replay's prediction again with the link as measured: round 0's measured duration
    (slowed by the destination populating fresh memory), then the bandwidth the later rounds
    moved (the experiment's ``link_bandwidth``) instead of the cap: what is left is the model's
    own error."""
    from migrator.experiment.results import fixed_downtime_ms
    from migrator.source.policy import PolicySettings
    from migrator.trace.file import read_trace
    from migrator.trace.predict import simulate

    bandwidth = float(row["link_bandwidth"]) / 4096
    pages = int(row["pages"])
    fixed_ms = fixed_downtime_ms(pages * 4096)
    p = simulate(read_trace(row["trace"]), bandwidth, stop_at=0, max_rounds=max_rounds, volume=pages,
                 start=float(row["replay_at_s"] or 0), fixed_ms=fixed_ms,
                 policy=PolicySettings(downtime_ms=downtime_ms, force_switchover=True),
                 first_round_s=record["report"]["rounds"][0]["duration_s"])
    return f"{p.rounds} rounds, {p.total_pages * 4096 / MB:.0f} MB"


def table(name: str, summary: dict, predictions: dict, rows: list[dict], records: dict, downtime_ms: float,
          max_rounds: int) -> str:
    lines = ["| cap | `migrator predict` (the program) | replay: predicted | replay: measured | link measured "
             "| replay: predicted for the measured link (round 0's time, then the rounds' rate) | rule | downtime ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cap = float(r["bandwidth_cap"])
        p = predictions[cap]["trace"]
        program = f"{p['rounds']} rounds, {p['sent_mb']:.0f} MB, {'converges' if p['converged'] else 'needs auto-converge'}"
        if r["result"] != "committed":
            lines.append(f"| {cap / MB:g} MB/s | {program} | - | failed: {r['error']} | - | - | - | - |")
            continue
        pages, predicted = int(r["pages"]), float(r["predict_sent_over_size"]) * int(r["pages"])
        sent = int(r["pages_sent"])
        lines.append(
            f"| {cap / MB:g} MB/s | {program} | {r['predict_rounds']} rounds, {predicted * 4096 / MB:.0f} MB, "
            f"final {float(r['predict_final_pages']):.0f} pages | {r['rounds']} rounds, {sent * 4096 / MB:.0f} MB "
            f"({sent / predicted:.2f}x), final {r['final_pages']} pages | {float(r['link_bandwidth']) / MB:.0f} MB/s "
            f"| {at_link(r, records[r['cell']], downtime_ms, max_rounds)} | {r['rule']} | {float(r['downtime_ms']):.1f} |")
    head = (f"{name}: {len(summary['intervals'])} intervals, mean dirty rate {summary['dirty_rate']:,.0f} pages/s, "
            f"working set {summary['wss_pages']:,} pages, attach stop {summary['stopped_ms']:.2f} ms; "
            f"replay guest {pages * 4096 / (1 << 20):.1f} MiB")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", default="redis,memcached")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--bandwidths", default="100M,200M")
    parser.add_argument("--downtime-ms", type=float, default=50.0)
    parser.add_argument("--max-rounds", type=int, default=15)
    parser.add_argument("--out", default="programs-out")
    parser.add_argument("--memcached-load", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memcached_load:
        memcached_load(args.memcached_load)
        return 0
    kinds = {"redis": Redis, "memcached": Memcached}
    names = args.programs.split(",")
    unknown = [n for n in names if n not in kinds]
    if unknown:
        parser.error(f"--programs: unknown {', '.join(unknown)} (known: {', '.join(kinds)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries, described = {}, {}
    with tempfile.TemporaryDirectory(prefix="programs-", dir="/tmp") as scratch:
        for name in names:
            program = kinds[name](scratch)
            try:
                summaries[name] = record(program, out, args.seconds, args.interval)
                described[name] = program.describe()
            finally:
                program.stop()
    bandwidths = args.bandwidths.split(",")
    predictions = {}
    for name in names:
        for b in bandwidths:
            result = predict(out / f"{name}.trace", b, args.downtime_ms)
            predictions.setdefault(name, {})[round(result["bandwidth_pages_s"] * 4096)] = result
        (out / f"{name}.predict.json").write_text(json.dumps(predictions[name], indent=1) + "\n")
    experiment = out / "experiment"
    traces = ",".join(str(out / f"{name}.trace") for name in names)
    argv = [*MIGRATOR, "experiment", "--traces", traces, "--bandwidths", args.bandwidths, "--downtime-ms",
            str(args.downtime_ms), "--max-rounds", str(args.max_rounds), "--no-compare", "--no-plots",
            "--out", str(experiment)]
    print(" ".join(argv[2:]), file=sys.stderr)
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=1800)
    if done.returncode != 0 and not (experiment / "results.csv").exists():
        sys.exit(f"record_programs: the experiment failed: {done.stderr.strip()[-400:]}")
    with open(experiment / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    records = {c["row"]["cell"]: c for c in json.loads((experiment / "results.json").read_text())["cells"]}
    parts = [f"`scripts/record_programs.py {' '.join(sys.argv[1:])}`; downtime target {args.downtime_ms:g} ms, "
             "forced switch-over after the round limit.\n"]
    for name in names:
        mine = [r for r in rows if Path(r["trace"]).name == f"{name}.trace"]
        predicted = {float(k): v for k, v in predictions[name].items()}
        by_cap = {float(r["bandwidth_cap"]): predicted[min(predicted, key=lambda c: abs(c - float(r["bandwidth_cap"])))]
                  for r in mine}
        parts.append(f"{described[name]}\n\n" + table(name, summaries[name], by_cap, mine, records,
                                                       args.downtime_ms, args.max_rounds))
    text = "\n".join(parts)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
