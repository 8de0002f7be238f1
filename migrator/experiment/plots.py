"""Plots of an experiment's results (PNG, matplotlib; ``pip install migrator[plot]``).

- ``plot_sweep``: rounds, downtime and data sent (over the region size) against r = dirty rate /
  bandwidth, one line per pattern, one column per bandwidth cap; the classic model dashed.
- ``plot_rounds``: dirty pages per round for chosen cells next to the model's curves.
- ``plot_trackers``: guest speed and migrator CPU per tracker.

Input is the experiment's JSON document (``results.json``): every function works from records
alone, so plots can be redrawn without rerunning (``migrator experiment --replot --out DIR``).
Importing this module needs matplotlib; the CLI imports it only to plot.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..core.errors import MigratorError
from ..core.files import open_output

MB = 1_000_000
PLOT_NAMES = ("sweep.png", "rounds.png", "throttle.png", "trackers.png")    # what plot_all may write
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


class NothingToPlot(MigratorError):
    """The document holds no data for this plot (a sweep that did not run)."""


def _figure(**kwargs) -> Figure:
    return Figure(layout="constrained", **kwargs)


def _save(fig: Figure, path: str | Path) -> None:
    """Draw ``fig`` as PNG into a new file renamed over ``path`` (``migrator.core.files``)."""
    with open_output(path) as f:
        fig.savefig(f, format="png", dpi=90)


def _cap_label(cap: float | None) -> str:
    return "unlimited" if cap is None else f"{cap / MB:g} MB/s"


def _log_y(ax) -> None:
    """Log y axis labelled with plain numbers (3, 10, 30) rather than powers of ten."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:g}"[0] in "25" else ""))


def _rate(pct: float | None) -> str:
    return "unlimited" if pct is None else f"{pct:g}"


def _pattern_colors(rows: list[dict]) -> dict[str, str]:
    order = ("uniform", "hot", "sequential", "replay")
    patterns = sorted({r["pattern"] for r in rows}, key=lambda p: (order.index(p.split(":")[0]), p))
    return {p: COLORS[i % len(COLORS)] for i, p in enumerate(patterns)}


LINE_DIMENSIONS = ("pattern", "tracker", "size_mib", "auto_converge")


def _lines(rows: list[dict]) -> dict[tuple, tuple[str, str]]:
    """One line per pattern; per (pattern, tracker, size, ...) when a custom sweep varies those
    too. Maps each line's key to (label, colour)."""
    dims = [d for d in LINE_DIMENSIONS if len({r[d] for r in rows}) > 1] or ["pattern"]
    keys = sorted({tuple(r[d] for d in dims) for r in rows}, key=str)
    if dims == ["pattern"]:
        keys = [(p,) for p in _pattern_colors(rows)]

    def label(key: tuple) -> str:
        return " ".join(f"{v:g} MiB" if d == "size_mib" else ("auto-converge" if v else "forced") if
                        d == "auto_converge" else str(v) for d, v in zip(dims, key))

    lines = {key: (label(key), COLORS[i % len(COLORS)]) for i, key in enumerate(keys)}
    return {"dims": dims, "lines": lines}


SWEEP_METRICS = (
    ("rounds", "model_rounds", "pre-copy rounds", False),
    ("downtime_ms", "model_downtime_ms", "downtime ms", True),
    ("sent_over_size", "model_sent_over_size", "data sent / region size", True),
)


def plot_sweep(document: dict, path: str | Path, sweep: str = "rate") -> None:
    """Measured (solid, filled markers) and classic-model (dashed) metrics against r."""
    rows = [c["row"] for c in document["cells"] if c["row"]["sweep"] == sweep and c["row"]["ratio"] is not None
            and c["row"]["result"] == "committed"]
    if not rows:
        raise NothingToPlot(f"no committed cells in the {sweep!r} sweep to plot")
    caps = sorted({r["bandwidth_cap"] for r in rows}, key=lambda c: math.inf if c is None else c)
    lines = _lines(rows)
    fig = _figure(figsize=(4.2 * len(caps) + 1, 9))
    axes = fig.subplots(len(SWEEP_METRICS), len(caps), squeeze=False, sharex="col")
    target = rows[0]["downtime_target_ms"]
    for col, cap in enumerate(caps):
        for row_i, (measured, modelled, label, log_y) in enumerate(SWEEP_METRICS):
            ax = axes[row_i][col]
            for key, (name, color) in lines["lines"].items():
                points = sorted((r for r in rows if r["bandwidth_cap"] == cap
                                 and tuple(r[d] for d in lines["dims"]) == key), key=lambda r: r["ratio"])
                if not points:
                    continue
                x = [r["ratio"] for r in points]
                ax.plot(x, [r[measured] for r in points], marker="o", color=color, label=name)
                ax.plot(x, [r[modelled] for r in points], linestyle="--", marker="x", color=color, alpha=0.7)
                stalled = [r for r in points if not r["converged"]]
                ax.plot([r["ratio"] for r in stalled], [r[measured] for r in stalled], linestyle="",
                        marker="o", markersize=11, markerfacecolor="none", color=color)
            ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
            if measured == "downtime_ms":
                ax.axhline(target, color="tab:red", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            if log_y:
                _log_y(ax)
            else:
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            if col == 0:
                ax.set_ylabel(label)
            if row_i == 0:
                ax.set_title(f"bandwidth {_cap_label(cap)}")
            if row_i == len(SWEEP_METRICS) - 1:
                ax.set_xlabel("r = dirty rate / bandwidth (pages/s over pages/s)")
    axes[0][0].legend(loc="upper left", fontsize="small", title="solid: measured, dashed: model\n"
                      "ringed: did not converge", title_fontsize="x-small")
    fixed = [f"{rows[0][d]:g} MiB" if d == "size_mib" else str(rows[0][d])
             for d in ("size_mib", "tracker") if d not in lines["dims"]]
    title = f"downtime target {target:g} ms (red)"
    fig.suptitle(f"pre-copy, {' '.join(fixed)}, {title}" if fixed else f"pre-copy, {title}")
    _save(fig, path)


def choose_cells(document: dict, sweep: str = "rate", per_pattern: int = 2) -> list[dict]:
    """Cells worth a per-round plot: per pattern, the converging cell with the most rounds and the
    cell with the highest r (which shows the stall, or the hot-set plateau)."""
    records = sweep_cells(document, sweep)
    chosen: list[dict] = []
    for pattern in _pattern_colors([c["row"] for c in records]):
        group = [c for c in records if c["row"]["pattern"] == pattern]
        converging = [c for c in group if c["row"]["converged"]]
        picks = []
        if converging:
            picks.append(max(converging, key=lambda c: (c["row"]["rounds"], c["row"]["ratio"])))
        picks.append(max(group, key=lambda c: c["row"]["ratio"]))
        for pick in picks:
            if pick not in chosen and len([c for c in chosen if c["row"]["pattern"] == pattern]) < per_pattern:
                chosen.append(pick)
    return chosen


MODEL_CURVES = (("classic", "--", "black", "model: classic"), ("pattern", "-.", "tab:red", "model: guest-aware"))


def plot_rounds(document: dict, path: str | Path, cells: list[dict]) -> None:
    """Dirty pages per round (bars; throttled rounds hatched; the stop-and-copy in orange) next to
    the classic model (V r^i, at most the region or the hot set) and the guest-aware one."""
    if not cells:
        raise NothingToPlot("no cells with rounds to plot")
    columns = min(3, len(cells))
    rows = math.ceil(len(cells) / columns)
    fig = _figure(figsize=(4.6 * columns, 3.6 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    for ax, record in zip(axes.flat, cells):
        row, rounds = record["row"], record["report"]["rounds"]
        shown = [r["dirty_pages"] for r in rounds]
        ax.bar([r["round"] for r in rounds], shown, color="tab:blue", alpha=0.7, label="measured")
        throttled = [r for r in rounds if r["throttle"] > 0]
        if throttled:
            ax.bar([r["round"] for r in throttled], [r["dirty_pages"] for r in throttled],
                   color="tab:blue", alpha=0.7, hatch="//", edgecolor="white", label="throttled")
        for name, style, color, label in MODEL_CURVES:
            curve = record["model"][name]
            ys = curve["pages"] + [curve["final_pages"]]
            ax.plot(range(len(ys)), ys, linestyle=style, marker=".", color=color, label=label)
            shown += ys
        if row["final_pages"] is not None:
            ax.bar([len(rounds)], [row["final_pages"]], color="tab:orange", label="stop-and-copy")
            shown.append(row["final_pages"])
        if min(shown) > 0 and max(shown) / min(shown) > 20:
            _log_y(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("dirty pages")
        guest = "as fast as it can" if row["dirty_pct"] is None else f"{row['dirty_pct']:g} %/s"
        ending = "auto-converge" if row["auto_converge"] else f"switch-over after {document['grid']['max_rounds']}"
        ax.set_title(f"{row['pattern']}, guest {guest}, link {_cap_label(row['bandwidth_cap'])}\n"
                     f"r = {row['ratio']:.2f}, {ending}; rule {row['rule']}", fontsize="small")
    axes.flat[0].legend(fontsize="x-small")
    _save(fig, path)


TRACKER_COLORS = {"untracked": "tab:gray", "wp-async": "tab:blue", "sync-wp": "tab:orange", "full": "tab:green"}


def plot_trackers(document: dict, path: str | Path) -> None:
    """Guest writes/s under each tracker (slowdown windows) and migrator CPU per round (migrations)."""
    slowdown = (document.get("slowdown") or {}).get("table") or []
    migrations = document.get("trackers") or []
    if not slowdown and not migrations:
        raise NothingToPlot("no tracker comparison in this experiment")
    fig = _figure(figsize=(11, 4.5))
    speed_ax, cpu_ax = fig.subplots(1, 2)
    if slowdown:
        names = [t["tracker"] for t in slowdown]
        rates = [t["steps_per_s"] / 1e6 for t in slowdown]
        speed_ax.bar(names, rates, color=[TRACKER_COLORS.get(n, "black") for n in names])
        speed_ax.errorbar(names, rates, fmt="none", color="black", capsize=4,
                          yerr=[[r - t["steps_per_s_min"] / 1e6 for r, t in zip(rates, slowdown)],
                                [t["steps_per_s_max"] / 1e6 - r for r, t in zip(rates, slowdown)]])
        speed_ax.set_ylabel("guest writes/s, millions")
        s = document["slowdown"]["settings"]
        speed_ax.set_title(f"guest slowdown: {s['size'] >> 20} MiB guest writing without limit, collect every "
                           f"{s['interval_s'] * 1e3:g} ms\n(median and range of {s['repeats']} windows)",
                           fontsize="small")
    if migrations:
        labels = [f"{m['pattern'].split(':')[0]} {_rate(m['dirty_pct'])} %/s" for m in migrations]
        for tracker in dict.fromkeys(m["tracker"] for m in migrations):
            mine = [i for i, m in enumerate(migrations) if m["tracker"] == tracker]
            cpu_ax.bar(mine, [migrations[i]["cpu_s_per_round"] * 1e3 for i in mine],
                       color=TRACKER_COLORS.get(tracker, "black"), label=tracker)
        cpu_ax.set_xticks(range(len(labels)), labels, fontsize="x-small", rotation=60, ha="right")
        cpu_ax.legend(fontsize="small")
        cpu_ax.set_ylabel("migrator CPU ms per round")
        _log_y(cpu_ax)
        cpu_ax.set_title("migrations of the tracker sweep (source process, all threads)", fontsize="small")
    _save(fig, path)


def sweep_cells(document: dict, sweep: str) -> list[dict]:
    return [c for c in document["cells"] if c["row"]["sweep"] == sweep and c["model"]
            and c["row"]["result"] == "committed"]


def main_sweep(document: dict) -> str:
    """The sweep the convergence plots draw: ``rate`` from the preset grids, else a custom one."""
    sweeps = {c["row"]["sweep"] for c in document["cells"]}
    return "rate" if "rate" in sweeps or "custom" not in sweeps else "custom"


def plot_all(document: dict, out_dir: str | Path) -> list[Path]:
    """Every plot the document has data for; returns the files written."""
    out = Path(out_dir)
    sweep = main_sweep(document)
    drawings = dict(zip(PLOT_NAMES, (
        lambda doc, path: plot_sweep(doc, path, sweep),
        lambda doc, path: plot_rounds(doc, path, choose_cells(doc, sweep)),
        lambda doc, path: plot_rounds(doc, path, sweep_cells(doc, "throttle")),
        plot_trackers,
    ), strict=True))
    written = []
    for name, draw in drawings.items():
        try:
            draw(document, out / name)
        except NothingToPlot:
            continue
        written.append(out / name)
    return written
