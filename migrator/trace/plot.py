"""The plot of a trace: dirty pages per interval and the working set as it grows (PNG).

Needs matplotlib (``pip install migrator[plot]``); only the commands that plot import this.
"""

from __future__ import annotations

import os

from matplotlib.figure import Figure

from ..core.files import open_output
from .model import Trace


def plot_trace(trace: Trace, path: str | os.PathLike) -> None:
    times, dirty, wss = [], [], []
    seen: set[int] = set()
    for interval in trace.intervals:
        seen |= trace.pages_of(interval)
        times.append(interval.t)
        dirty.append(interval.dirty_pages)
        wss.append(len(seen))
    fig = Figure(layout="constrained", figsize=(8, 4.5))
    ax = fig.add_subplot()
    ax.bar(times, dirty, width=[i.seconds * 0.9 for i in trace.intervals] or 0.1, align="edge",
           color="tab:blue", label="dirty pages per interval")
    ax.set_xlabel("seconds since attach")
    ax.set_ylabel("pages written in the interval")
    ws = ax.twinx()
    ws.plot(times, wss, color="tab:orange", label="working set (distinct pages so far)")
    ws.set_ylabel("working set, pages")
    ax.set_title(f"process {trace.pid} {trace.command}".strip()[:80])
    handles = ax.get_legend_handles_labels()[0] + ws.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left")
    with open_output(path) as f:
        fig.savefig(f, format="png", dpi=90)
