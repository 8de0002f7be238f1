"""Measure how pre-copy converges: a grid of real migrations, a tracker comparison, plots.

Each cell spawns a guest writing a set share of its pages per second with a pattern (or, with
--traces, replaying a recorded trace: ``guest --replay``, next to ``predict``'s rounds), and migrates
it over loopback TCP (a ``migrator receive`` child) with a tracker and a bandwidth cap. Writes
results.csv (one row per cell), results.json (rows, per-round reports, model curves, tracker
comparison), summary.md (tables) and PNG plots to --out. Without --sizes/--rates/... the preset
grid runs (--quick: a < 60 s smoke run); with any of them, one product sweep over the given lists.

Needs what ``migrator migrate`` needs: userfaultfd WP_ASYNC (Linux 6.7+; ``migrator probe``),
ptrace-read rights over the guests (it spawns them, so the default Yama scope allows it), and
matplotlib for the plots (``pip install migrator[plot]``; --no-plots otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..core.errors import MigratorError
from ..core.files import check_output
from . import exits, interrupts, options
from ..experiment import compare, grid as g, results
from ..experiment.run import run_experiment
from ..experiment.summary import summary_markdown, write_summary
from ..guest.replay import load_plan


RESULTS = ("results.csv", "results.json", "summary.md")


def _list(item):
    """An argparse type: a comma-separated list of ``item`` values."""
    def parse(text: str) -> list:
        try:
            return g.parse_list(text, item)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the CI smoke grid (a few 16-32 MiB cells, < 60 s)")
    parser.add_argument("--out", default="experiment-out", metavar="DIR", help="output directory (default experiment-out)")
    sweep = parser.add_argument_group("custom sweep (replaces the preset grid's cells)")
    sweep.add_argument("--sizes", type=_list(options.parse_guest_size), metavar="64M,256M")
    sweep.add_argument("--rates", type=_list(g.parse_dirty_percent), metavar="PCT,...",
                       help="dirty rates in %% of the region's pages per second, e.g. 0.1,1,20 "
                            "(unlimited: as fast as the guest can)")
    sweep.add_argument("--bandwidths", type=_list(g.parse_bandwidth), metavar="50M,unlimited",
                       help="link caps in bytes/s (50M, 1G, 500mbit) or unlimited")
    sweep.add_argument("--patterns", type=_list(g.parse_pattern), metavar="uniform,hot:0.05:0.9,sequential")
    sweep.add_argument("--trackers", type=_list(g.parse_tracker), metavar="wp-async,sync-wp,full")
    sweep.add_argument("--traces", type=_list(str), metavar="T1.trace,T2.trace",
                       help="cells whose guest replays each trace (migrator track --record) over the "
                            "bandwidths and trackers, each next to predict's rounds for the same settings")
    sweep.add_argument("--auto-converge", action="store_true",
                       help="throttle the guest when not converging (default: switch over after --max-rounds)")
    settings = parser.add_argument_group("settings of every migration")
    settings.add_argument("--downtime-ms", type=options.positive, help="switch-over target (default 10)")
    settings.add_argument("--max-rounds", type=options.count, help="rounds before the forced switch-over or "
                          "auto-converge (default 15)")
    settings.add_argument("--compress", type=options.compress, metavar="zstd:LEVEL|none",
                          help="default none (the model counts raw pages)")
    settings.add_argument("--fill", choices=("random", "text", "sparse"), help="guest page contents (default random)")
    settings.add_argument("--repeats", type=options.count, help="runs of each cell (default 1)")
    parser.add_argument("--no-compare", action="store_true", help="skip the tracker comparison's slowdown windows")
    parser.add_argument("--no-plots", action="store_true", help="write CSV/JSON only")
    parser.add_argument("--replot", action="store_true", help="redraw plots and summary from DIR/results.json, run nothing")


def build_grid(args: argparse.Namespace) -> g.Grid:
    grid = g.quick_grid() if args.quick else g.default_grid()
    dimensions = {k: getattr(args, k) for k in ("sizes", "rates", "bandwidths", "patterns", "trackers")}
    if any(v is not None for v in dimensions.values()) or args.auto_converge or args.traces:
        chosen = {k: v for k, v in dimensions.items() if v is not None}
        traces = [(os.path.abspath(path), load_plan(path).geometry().size) for path in args.traces or ()]
        grid = g.custom_grid(grid, auto_converge=args.auto_converge, traces=traces, **chosen)
    overrides = {k: getattr(args, k) for k in ("downtime_ms", "max_rounds", "compress", "fill", "repeats")}
    grid = replace(grid, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_compare:
        grid = replace(grid, compare=replace(grid.compare, enabled=False))
    return grid


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.replot:
        return _replot(out, args)
    grid = build_grid(args)
    out.mkdir(parents=True, exist_ok=True)
    with exits.preflight():
        _check_outputs(out, args, RESULTS + ("receiver.log",))
    started = time.perf_counter()
    document = {
        "kind": "experiment",
        "command": " ".join(["migrator", "experiment", *sys.argv[2:]]) if sys.argv[1:2] == ["experiment"] else " ".join(sys.argv),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": _machine(),
        "grid": _grid_settings(grid),
        "cells": [],
    }
    rows: list[dict] = []

    def on_result(result: results.CellResult) -> None:
        record = results.cell_record(result, grid)
        document["cells"].append(record)
        rows.append(record["row"])
        results.write_csv(rows, out / "results.csv")   # after every cell: a long run leaves partial results

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(f"experiment {grid.name}: {len(grid.runs())} migrations -> {out}/")
    _, windows = interrupts.run(functools.partial(run_experiment, grid, out, log=log, on_result=on_result))
    document["slowdown"] = {
        "settings": asdict(grid.compare),
        "windows": [asdict(w) | {"steps_per_s": w.steps_per_s} for w in windows],
        "table": compare.slowdown_table(windows) if windows else [],
    }
    document["trackers"] = compare.migration_table(rows)
    document["duration_s"] = time.perf_counter() - started
    document["machine"]["loadavg_end"] = os.getloadavg()
    results.write_json(document, out / "results.json")
    _finish(document, out, args)
    failed = sum(1 for r in rows if r["result"] != "committed")
    log(f"{len(rows)} migrations in {document['duration_s']:.0f} s, {failed} failed; results in {out}/")
    return 1 if failed else 0


def _replot(out: Path, args: argparse.Namespace) -> int:
    """Recompute rows and model curves from the stored reports, rewrite CSV/JSON, redraw."""
    path = out / "results.json"
    try:
        with open(path) as f:
            document = json.load(f)
        if document.get("kind") != "experiment":
            raise ValueError("its kind is not 'experiment'")
        settings = document["grid"]
        grid = g.Grid(settings["name"], cells=tuple(results.cell_from_row(c["row"]) for c in document["cells"]),
                      downtime_ms=settings["downtime_ms"], max_rounds=settings["max_rounds"])
        results.recompute(document, grid)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MigratorError(f"{path} is not a readable experiment result ({type(exc).__name__}: {exc})") from None
    _check_outputs(out, args, RESULTS)
    rows = [c["row"] for c in document["cells"]]
    results.write_csv(rows, out / "results.csv")
    document["trackers"] = compare.migration_table(rows)
    results.write_json(document, path)
    _finish(document, out, args)
    return 0


def _check_outputs(out: Path, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Refuse, before anything runs, outputs that could not be written after it: a link at one of
    the files' paths in ``out``, or plots without matplotlib."""
    if not args.no_plots:
        names += _plots().PLOT_NAMES
    for name in names:
        check_output(out / name)


def _plots():
    try:
        from ..experiment import plots
    except ImportError as exc:
        raise MigratorError(f"plotting needs matplotlib (pip install migrator[plot]) or --no-plots: {exc}") from None
    return plots


def _finish(document: dict, out: Path, args: argparse.Namespace) -> None:
    write_summary(document, out / "summary.md")
    if not args.no_plots:
        for path in _plots().plot_all(document, out):
            print(f"wrote {path}", file=sys.stderr)
    print(summary_markdown(document))


def _machine() -> dict:
    return {
        "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def _grid_settings(grid: g.Grid) -> dict:
    return {
        "name": grid.name, "cells": len(grid.cells), "repeats": grid.repeats, "downtime_ms": grid.downtime_ms,
        "max_rounds": grid.max_rounds, "compress": grid.compress, "fill": grid.fill, "settle_s": grid.settle_s,
    }
