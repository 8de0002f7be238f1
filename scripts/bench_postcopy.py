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

``--grid`` runs issue 17's experiment instead: every mode at every dirty rate (``--rates``) and
link cap (``--bandwidths``), by default on 256 MiB guests, each cell on a fresh guest and
receiver. Per cell: downtime, total time (and over pushing the region once on that link), bytes
on the wire and pages sent, the guest's slowdown (its writes/s during post-copy against before;
for a run that never switched, the max throttle duty and the rounds), the rule that ended
pre-copy and whether it verified. A cell that fails is recorded with its one-line error and the
grid goes on; guests a cell left behind are killed. The table prints as Markdown; ``--plot``
draws downtime and total time per cell, one column per link.

    .venv/bin/python scripts/bench_postcopy.py --grid [--rates 5000,50000,unlimited] [--bandwidths unlimited,200M] [--plot grid.png] [--json grid.json]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import trio

from bench_migrate import PS, Receiver, migrate, push_once
from harness.bench import finish, goal
from migrator.cli.render import check_outputs, format_round_table, format_summary
from migrator.core.errors import MigratorError
from migrator.core.units import parse_rate
from migrator.guest.layout import parse_size
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.tracker.memory import ProcessMemory

MODES = {
    "precopy": {},
    "hybrid": {"postcopy_auto": True},
    "postcopy": {"postcopy_after": 0},
}
WARM_S = 1.0     # the guest writes this long before it is measured or migrated


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default=None, help="guest size (default 1G, with --grid 256M)")
    ap.add_argument("--rate", default="unlimited", help="guest page writes per second, or unlimited")
    ap.add_argument("--fill", default="random", choices=("random", "text", "sparse"))
    ap.add_argument("--downtime-ms", type=float, default=10.0)
    ap.add_argument("--compress", default="none")
    ap.add_argument("--modes", default="precopy,hybrid,postcopy")
    ap.add_argument("--grid", action="store_true", help="every mode across --rates and --bandwidths")
    ap.add_argument("--rates", default="5000,50000,unlimited", help="with --grid: guest page writes/s, or unlimited")
    ap.add_argument("--bandwidths", default="unlimited,200M", help="with --grid: link caps (bytes/s, e.g. 200M), or unlimited")
    ap.add_argument("--cell-timeout", type=float, default=180.0, metavar="S", help="with --grid: one migration's limit")
    ap.add_argument("--plot", metavar="PATH", help="with --grid: downtime and total time per cell (PNG)")
    ap.add_argument("--json", metavar="PATH", help="write results here ('-' for stdout)")
    args = ap.parse_args()
    try:
        size = parse_size(args.size or ("256M" if args.grid else "1G"))
        rate = _rate(args.rate)
    except ValueError as exc:
        ap.error(str(exc))
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")
    if not args.grid:
        if args.plot:
            ap.error("--plot draws the grid: add --grid")
        return run_single(args, size, rate, modes)
    try:
        rates = [_rate(r) for r in args.rates.split(",") if r]
        bandwidths = [None if b == "unlimited" else parse_rate(b) for b in args.bandwidths.split(",") if b]
        if args.plot:
            check_outputs(plot=args.plot)
    except (ValueError, MigratorError) as exc:
        ap.error(str(exc))
    if not rates or not bandwidths:
        ap.error("--rates and --bandwidths need at least one value each")
    return run_grid(args, size, rates, bandwidths, modes)


def _rate(text: str) -> float | None:
    """A guest's page writes/s, None for unlimited; ValueError with one line."""
    if text == "unlimited":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a page write rate: {text!r} (a number, or unlimited)") from None
    if not value > 0:
        raise ValueError(f"page write rate must be positive: {text!r}")
    return value


def run_single(args, size: int, rate: float | None, modes: list[str]) -> int:
    """One guest size and rate in each of ``modes``, with the goals."""
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




# --- the grid (issue 17's experiment) --------------------------------------------------------------


def run_grid(args, size: int, rates: list[float | None], bandwidths: list[float | None], modes: list[str]) -> int:
    """Every mode at every (bandwidth, rate), each on a fresh guest and receiver. A cell that fails
    is recorded with its one-line error and the grid goes on; guests a cell left are killed."""
    work = tempfile.mkdtemp(prefix="bench-postcopy-grid-")
    settings = MigrateSettings(downtime_ms=args.downtime_ms, compress=args.compress)
    out: dict = {"size": size, "settings": vars(args)}

    push_s: dict[str, float] = {}
    with spawn_guest(os.path.join(work, "base.sock"), size=size, dirty_rate=rates[0], fill=args.fill) as guest:
        time.sleep(WARM_S)
        region = guest.client().attach("none").layout.regions[0]
        buffer = bytearray(region.length)
        ProcessMemory(guest.pid).read_runs([(region.start, region.length // PS)], buffer)
        for bw in bandwidths:
            s = replace(settings, bandwidth=bw)
            push_s[link_label(bw)] = min(trio.run(push_once, buffer, region.start, s)[0] for _ in range(2))
            print(f"baseline push once, link {link_label(bw)}: {push_s[link_label(bw)] * 1000:.1f} ms", flush=True)
        del buffer

    cells, reports = [], []
    for bw in bandwidths:
        for rate in rates:
            for mode in modes:
                name = f"{mode}-{link_label(bw)}-{rate_label(rate)}".replace(" ", "").replace("/", "")
                s = MigrateSettings(**{**replace(settings, bandwidth=bw).__dict__, **MODES[mode]})
                started = time.perf_counter()
                try:
                    report, dest = grid_migration(work, name, size, rate, args.fill, s, args.cell_timeout)
                    cell = cell_of(report, dest, push_s[link_label(bw)])
                except Exception as exc:  # noqa: BLE001 - one cell's failure is a result, not the grid's end
                    report, cell = None, {"result": "failed", "verified": False, "error": one_line(exc)}
                cell = {"link": link_label(bw), "bandwidth": bw, "rate": rate, "mode": mode, **cell,
                        "wall_s": round(time.perf_counter() - started, 2)}
                left = kill_leftovers(work)
                if left:
                    cell["killed_guests"] = left
                cells.append(cell)
                reports.append({"link": cell["link"], "rate": rate, "mode": mode, "report": report})
                print(cell_line(cell), flush=True)

    print()
    print(grid_table(cells))
    ok = sum(c["result"] == "committed" and c["verified"] for c in cells)
    goals = [goal("grid cells committed and verified", ok, None, len(cells), ok == len(cells))]
    out["grid"] = {"rates": rates, "bandwidths": bandwidths, "modes": modes, "push_s": push_s, "cells": cells}
    out["reports"] = reports
    out["goals"] = goals
    if args.plot:
        plot_grid(out["grid"], size, args.plot)
        print(f"plot: {args.plot}")
    return finish(out, goals, args.json)


def grid_migration(work: str, name: str, size: int, rate: float | None, fill: str, settings: MigrateSettings,
                   timeout_s: float) -> tuple[dict, dict | None]:
    """One migration of a fresh guest to a fresh ``receive --prepare``, at most ``timeout_s``: the
    source's report and the destination's (None when the receiver had to be killed)."""
    with spawn_guest(os.path.join(work, f"{name}.sock"), size=size, dirty_rate=rate, fill=fill) as guest:
        time.sleep(WARM_S)
        receiver = Receiver(work, name, size, memfd=False, prepare=True)
        deadline = time.monotonic() + timeout_s

        async def run():
            with trio.move_on_after(timeout_s):
                return await SourceMigration(guest.control, receiver.address,
                                             replace(settings, token=receiver.token)).run()
            raise TimeoutError(f"no result within --cell-timeout {timeout_s:g} s")

        try:
            report = trio.run(run).to_dict()
        except BaseException as exc:
            if receiver.popen.poll() is None:
                receiver.popen.kill()
            receiver.popen.wait()
            if isinstance(exc, Exception) and time.monotonic() >= deadline:
                raise TimeoutError(f"stopped at --cell-timeout {timeout_s:g} s: {one_line(exc)}") from exc
            raise
        try:
            dest = receiver.finish()
        except (OSError, ValueError, subprocess.TimeoutExpired):
            if receiver.popen.poll() is None:
                receiver.popen.kill()
                receiver.popen.wait()
            dest = None
    return report, dest


def cell_of(report: dict, dest: dict | None, push_s: float) -> dict:
    """One cell's figures from its source report (and the destination's verdict)."""
    pc = report.get("postcopy") or {}
    before, after = pc.get("guest_rate_before"), pc.get("guest_rate_after")
    committed = report["result"] == "committed"
    return {
        "result": report["result"] if committed else "failed",
        "verified": bool(report["verified"]),
        "error": report["error"],
        "destination": None if dest is None else dest.get("result"),
        "rule": report["rule"],
        "downtime_ms": report["downtime_ms"],
        "total_s": report["total_s"],
        "total_over_push": report["total_s"] / push_s,
        "bytes_wire": report["bytes_wire"],
        "pages_sent": report["pages_sent"],
        "rounds": len(report["rounds"]),
        "throttle_max": report["throttle_max"],
        "switch_round": pc.get("switch_round"),
        "stale_pages": pc.get("stale_pages"),
        "requested_pages": pc.get("requested_pages"),
        "pushed_pages": pc.get("pushed_pages"),
        "postcopy_s": pc.get("duration_s"),
        "faults": pc.get("faults"),
        "fault_p50_ms": pc.get("fault_p50_ms"),
        "fault_p99_ms": pc.get("fault_p99_ms"),
        "fault_max_ms": pc.get("fault_max_ms"),
        "guest_rate_before": before,
        "guest_rate_during": after,
        "guest_during_over_before": after / before if before and after is not None else None,
    }


def guest_pids(work: str) -> dict[int, str]:
    """The ``migrator guest`` processes whose control socket is under ``work``, this grid's own
    (its source guests and its receivers' restore guests), with their command lines."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in ps.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "migrator guest" in args and f"--control {work}/" in args:
            found[int(pid)] = args
    return found


def kill_leftovers(work: str, grace_s: float = 3.0) -> list[str]:
    """SIGKILL this grid's guests still running ``grace_s`` after a cell (a guest exits by itself
    after a migration; one a failed cell left would not); the command lines of those killed."""
    deadline = time.monotonic() + grace_s
    while (left := guest_pids(work)) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = []
    for pid, args in sorted(left.items()):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{pid} {args}")
        except ProcessLookupError:
            pass
    return killed


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def link_label(bw: float | None) -> str:
    return "unlimited" if bw is None else f"{bw / 1e6:g} MB/s"


def rate_label(rate: float | None) -> str:
    return "unlimited" if rate is None else f"{rate:,.0f}"


def slowdown(c: dict) -> str:
    """The guest's slowdown: its writes/s during post-copy against before; a run that never
    switched (pre-copy, a hybrid that converged): the max throttle duty over its rounds."""
    if c.get("guest_during_over_before") is not None:
        return f"{c['guest_rate_during']:,.0f}/{c['guest_rate_before']:,.0f} = {c['guest_during_over_before']:.2f}×"
    return f"throttle max {c['throttle_max']:.0%}"


def cell_line(c: dict) -> str:
    if c["result"] != "committed":
        return f"{c['link']:>10} {rate_label(c['rate']):>9} {c['mode']:9} FAILED: {c['error']}"
    return (f"{c['link']:>10} {rate_label(c['rate']):>9} {c['mode']:9} downtime {c['downtime_ms'] or 0:7.1f} ms, "
            f"total {c['total_s']:6.2f} s, {c['rounds']} rounds, rule {c['rule']}, verified {c['verified']}")


def grid_table(cells: list[dict]) -> str:
    """The cells as a Markdown table (the one docs/results.md shows)."""
    head = ("| link | guest writes/s | mode | downtime ms | total s (× push) | wire MB | pages sent | rounds "
            "| guest slowdown | fault p50 / p99 ms | rule | verified |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        if c["result"] != "committed":
            rows.append(f"| {c['link']} | {rate_label(c['rate'])} | {c['mode']} | failed: {c['error']} "
                        + "| " * 8 + "|")
            continue
        faults = "-" if c["fault_p50_ms"] is None else f"{c['fault_p50_ms']:.3g} / {c['fault_p99_ms']:.3g}"
        rows.append(
            f"| {c['link']} | {rate_label(c['rate'])} | {c['mode']} | {c['downtime_ms'] or 0:.1f} "
            f"| {c['total_s']:.2f} ({c['total_over_push']:.2f}×) | {c['bytes_wire'] / 1e6:,.0f} "
            f"| {c['pages_sent']:,} | {c['rounds']} | {slowdown(c)} | {faults} | {c['rule']} "
            f"| {'yes' if c['verified'] else 'NO'} |")
    return "\n".join(rows)


def plot_grid(grid: dict, size: int, path: str) -> None:
    """Downtime and total time per cell: one column per link, the modes side by side per dirty rate."""
    from matplotlib.figure import Figure
    from migrator.experiment.plots import COLORS, LOG_SPAN, _log_axis

    links = [link_label(bw) for bw in grid["bandwidths"]]
    rates, modes = grid["rates"], grid["modes"]
    fig = Figure(layout="constrained", figsize=(5.5 * len(links), 7))
    axes = fig.subplots(2, len(links), squeeze=False)
    width = 0.8 / len(modes)
    for col, link in enumerate(links):
        cells = {(c["rate"], c["mode"]): c for c in grid["cells"] if c["link"] == link}
        for row, (key, label) in enumerate((("downtime_ms", "downtime (ms)"), ("total_s", "total time (s)"))):
            ax = axes[row][col]
            shown = []
            for m, mode in enumerate(modes):
                xs, ys = [], []
                for i, rate in enumerate(rates):
                    c = cells.get((rate, mode))
                    x = i + (m - (len(modes) - 1) / 2) * width
                    if c is None or c["result"] != "committed" or c[key] is None:
                        ax.text(x, 0.02, "failed", rotation=90, ha="center", va="bottom", fontsize="x-small",
                                transform=ax.get_xaxis_transform())
                        continue
                    xs.append(x)
                    ys.append(c[key])
                ax.bar(xs, ys, width, color=COLORS[m % len(COLORS)], label=mode)
                shown += ys
            if row == 1:
                push = grid["push_s"][link]
                ax.axhline(push, color="black", linestyle="--", linewidth=1, label="push once")
                shown.append(push)
            positive = [v for v in shown if v > 0]
            if positive and max(positive) / min(positive) > LOG_SPAN:
                ax.set_ylim(min(positive) / 1.5, max(positive) * 1.5)
                _log_axis(ax, "y")
            ax.set_xticks(range(len(rates)), [rate_label(r) for r in rates])
            ax.set_xlabel("guest dirty rate (page writes/s)")
            ax.set_ylabel(label)
            ax.set_title(f"{size / 2**20:g} MiB guest, link {link}", fontsize="small")
        axes[0][col].legend(fontsize="x-small")
        axes[1][col].legend(fontsize="x-small")
    with open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)


if __name__ == "__main__":
    sys.exit(main())
