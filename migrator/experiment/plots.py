"""Plots of an experiment's results (PNG, matplotlib; ``pip install migrator[plot]``).

- ``plot_sweep``: rounds, downtime and data sent (over the region size) against r = dirty rate /
  bandwidth, one line per pattern, one column per bandwidth cap; the classic model dashed.
- ``plot_rounds``: dirty pages per round for chosen cells next to the model's curves.
- ``plot_trackers``: guest speed and migrator CPU per tracker.

Input is the experiment's JSON document (``results.json``): every function works from records
alone, so plots can be redrawn without rerunning (``migrator experiment --replot --out DIR``).
Each ``plot_*`` saves the figure its ``*_figure`` builds (tests inspect those). Log axes carry
plain-number labels at 1, 2 and 5 times powers of ten (denser over a narrow range): matplotlib's
default labels only the powers of ten, so an axis spanning less than a decade showed one label
or none. Importing this module needs matplotlib; the CLI imports it only to plot.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

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


LOG_SPAN = 20          # bars spanning more than this factor get a log axis; linear bars read better below
LOG_SUBS = ((1.0,), (1.0, 2.0, 5.0), tuple(float(m) for m in range(1, 10)))   # sparse to dense


def _plain(value: float, _position=None) -> str:
    """A tick value as people write it: 0.05, 3, 20,000 (never 2e+04 or 10^4)."""
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}"


def _log_axis(ax, which: str) -> None:
    """Log scale on ``ax``'s ``which`` ("x" or "y") axis whose labelled (major) ticks are the
    sparsest of 10^k, {1, 2, 5}·10^k, {1..9}·10^k that puts at least two within the view. The
    densest always does: over a range narrower than from one of its ticks to the next,
    matplotlib's ``LogLocator`` places linear ticks instead. Call it once the axes holds all its
    data: it reads the view limits."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    low, high = axis.get_view_interval()
    for subs in LOG_SUBS:
        if sum(low <= t <= high for t in LogLocator(subs=subs).tick_values(low, high)) >= 2:
            break
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(_plain))
    axis.set_minor_locator(LogLocator(subs=LOG_SUBS[-1]) if subs != LOG_SUBS[-1] else NullLocator())
    axis.set_minor_formatter(NullFormatter())


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
    ("rounds", "model_rounds", "pre-copy rounds (count)", False),
    ("downtime_ms", "model_downtime_ms", "downtime (ms)", True),
    ("sent_over_size", "model_sent_over_size", "data sent / region size (ratio)", True),
)
RATIO_LABEL = "r = dirty rate / bandwidth (ratio of pages/s)"


def plot_sweep(document: dict, path: str | Path, sweep: str = "rate") -> None:
    _save(sweep_figure(document, sweep), path)


def sweep_figure(document: dict, sweep: str = "rate") -> Figure:
    """Measured (solid, filled markers) and classic-model (dashed) metrics against r."""
    rows = [c["row"] for c in document["cells"] if c["row"]["sweep"] == sweep and c["row"]["ratio"] is not None
            and c["row"]["result"] == "committed"]
    if not rows:
        raise NothingToPlot(f"no committed cells in the {sweep!r} sweep to plot")
    caps = sorted({r["bandwidth_cap"] for r in rows}, key=lambda c: math.inf if c is None else c)
    lines = _lines(rows)
    fig = _figure(figsize=(4.2 * len(caps) + 1, 9))
    axes = fig.subplots(len(SWEEP_METRICS), len(caps), squeeze=False)
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
            if log_y:
                _log_axis(ax, "y")
            else:
                ax.set_ylim(bottom=0)
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            _log_axis(ax, "x")
            ax.set_ylabel(label)
            ax.set_xlabel(RATIO_LABEL, fontsize="small")
            if row_i == 0:
                ax.set_title(f"bandwidth {_cap_label(cap)}")
    axes[0][0].legend(loc="upper left", fontsize="small", title="solid: measured, dashed: model\n"
                      "ringed: did not converge", title_fontsize="x-small")
    fixed = [f"{rows[0][d]:g} MiB" if d == "size_mib" else str(rows[0][d])
             for d in ("size_mib", "tracker") if d not in lines["dims"]]
    title = f"downtime target {target:g} ms (red)"
    fig.suptitle(f"pre-copy, {' '.join(fixed)}, {title}" if fixed else f"pre-copy, {title}")
    return fig


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
    _save(rounds_figure(document, cells), path)


def rounds_figure(document: dict, cells: list[dict]) -> Figure:
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
        if min(shown) > 0 and max(shown) / min(shown) > LOG_SPAN:
            _log_axis(ax, "y")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (number; last: stop-and-copy)")
        ax.set_ylabel("dirty pages (count)")
        guest = "as fast as it can" if row["dirty_pct"] is None else f"{row['dirty_pct']:g} %/s"
        ending = "auto-converge" if row["auto_converge"] else f"switch-over after {document['grid']['max_rounds']}"
        ax.set_title(f"{row['pattern']}, guest {guest}, link {_cap_label(row['bandwidth_cap'])}\n"
                     f"r = {row['ratio']:.2f}, {ending}; rule {row['rule']}", fontsize="small")
    axes.flat[0].legend(fontsize="x-small")
    return fig


TRACKER_COLORS = {"untracked": "tab:gray", "wp-async": "tab:blue", "sync-wp": "tab:orange", "full": "tab:green"}


def plot_trackers(document: dict, path: str | Path) -> None:
    _save(trackers_figure(document), path)


def trackers_figure(document: dict) -> Figure:
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
        speed_ax.set_xlabel("tracker")
        speed_ax.set_ylabel("guest writes/s (millions)")
        s = document["slowdown"]["settings"]
        speed_ax.set_title(f"guest slowdown: {s['size'] >> 20} MiB guest writing without limit, collect every "
                           f"{s['interval_s'] * 1e3:g} ms\n(median and range of {s['repeats']} windows)",
                           fontsize="small")
    if migrations:
        labels = _migration_labels(migrations)
        for tracker in dict.fromkeys(m["tracker"] for m in migrations):
            mine = [i for i, m in enumerate(migrations) if m["tracker"] == tracker]
            cpu_ax.bar(mine, [migrations[i]["cpu_s_per_round"] * 1e3 for i in mine],
                       color=TRACKER_COLORS.get(tracker, "black"), label=tracker)
        cpu_ax.set_xticks(range(len(labels)), labels, fontsize="x-small", rotation=60, ha="right")
        cpu_ax.legend(fontsize="small")
        cpu_ax.set_xlabel("tracker: guest pattern, dirty rate (% of pages/s)")
        cpu_ax.set_ylabel("migrator CPU per round (ms)")
        cpu = [m["cpu_s_per_round"] for m in migrations]
        if min(cpu) > 0 and max(cpu) / min(cpu) > LOG_SPAN:
            _log_axis(cpu_ax, "y")
        cpu_ax.set_title("migrations of the tracker sweep (source process, all threads)", fontsize="small")
    return fig


def _migration_labels(migrations: list[dict]) -> list[str]:
    """One distinct label per migration of the tracker sweep: its tracker, pattern and dirty rate,
    and its bandwidth cap too when that tells otherwise equal ones apart."""
    labels = [f"{m['tracker']}: {m['pattern'].split(':')[0]} {_rate(m['dirty_pct'])} %/s" for m in migrations]
    if len(set(labels)) < len(labels):
        labels = [f"{label}, {_cap_label(m.get('bandwidth_cap'))}" for label, m in zip(labels, migrations)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


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
