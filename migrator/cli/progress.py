"""Rendering a running migration's ``Progress`` snapshots: a live line, settled lines, JSON lines.

On a terminal one line is rewritten in place with every snapshot (elapsed, round, sent and left of
the round, bytes on the wire, dirty rate, throughput, expected downtime against the target,
throttle, the round's ETA), and each finished round leaves a settled line behind it; both fit 100
columns. Elsewhere (a pipe, a log file) only the settled lines are written, so a log does not fill
with carriage returns. ``--progress-json`` writes every snapshot as one JSON line instead, for
programs. Plain ANSI (carriage return, erase to end of line) does all a terminal needs here, so no
terminal library is pulled in.
"""

from __future__ import annotations

import json
from typing import TextIO

from ..core.documents import to_data
from ..source.progress import Progress
from ..source.report import RoundStats

WIDTH = 100
ERASE = "\x1b[K"     # erase to the end of the line


def size(n: float | None) -> str:
    """Bytes in at most 5 characters: 512B, 93.8M, 1.2G."""
    if n is None:
        return "-"
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{n:.0f}B"


def rate(n: float) -> str:
    """A count per second in at most 6 characters: 950, 20.0k, 1.3M."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}" if n / scale < 100 else f"{n / scale:.0f}{unit}"
    return f"{n:.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def duration(seconds: float | None) -> str:
    """Seconds in at most 6 characters: 12.3s, 27m45s, 2h03m."""
    if seconds is None:
        return "-"
    if seconds < 100:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    return f"{minutes}m{int(seconds % 60):02d}s" if minutes < 100 else f"{minutes // 60}h{minutes % 60:02d}m"


_STAGE = {"starting": "starting", "switchover": "final", "committed": "committed", "failed": "failed"}


def format_live(p: Progress) -> str:
    """The live line: what the migration is doing now."""
    stage = f"round {p.round}" if p.phase == "precopy" else _STAGE[p.phase]
    sent = f"{size(p.round_sent_bytes)}/{size(p.round_sent_bytes + p.remaining_bytes)}"
    line = (f"{duration(p.elapsed_s):>6} {stage:<9} sent {sent} wire {size(p.transferred_wire_bytes)} "
            f"dirty {rate(p.dirty_rate)}/s {size(p.throughput)}/s "
            f"exp {_ms(p.expected_downtime_ms)}/{_ms(p.downtime_target_ms)}ms thr {p.throttle * 100:.0f}% "
            f"eta {duration(p.eta_s)}")
    return line[:WIDTH]


def format_settled(stats: RoundStats, target_ms: float | None = None) -> str:
    """The line a finished round leaves: its pages, bytes, time, rates and downtime estimate."""
    target = "" if target_ms is None else f"/{_ms(target_ms)}"
    line = (f"round {stats.round:<3} {stats.dirty_pages:>7} pages {size(stats.bytes_raw):>5} raw "
            f"{size(stats.bytes_wire):>5} wire {duration(stats.duration_s):>5} {size(stats.bandwidth):>5}/s "
            f"dirty {rate(stats.dirty_rate)}/s exp {_ms(stats.expected_downtime_ms)}{target}ms "
            f"thr {stats.throttle * 100:.0f}%")
    return line[:WIDTH]


def format_json(p: Progress) -> str:
    """One JSON line: every field of the snapshot (``docs/reports.md``)."""
    return json.dumps(to_data(p), separators=(",", ":"))


class ProgressView:
    """A ``Progress`` consumer that writes to ``stream``: ``live`` rewrites one line in place (a
    terminal), ``json_lines`` writes every snapshot as JSON; otherwise settled lines only."""

    def __init__(self, stream: TextIO, *, live: bool = False, json_lines: bool = False) -> None:
        self.stream = stream
        self.live = live and not json_lines
        self.json_lines = json_lines
        self._showing = False
        self._control_shown = False

    def __call__(self, p: Progress) -> None:
        out = self.stream
        if self.json_lines:
            out.write(format_json(p) + "\n")
        else:
            if p.control is not None and not self._control_shown:
                self._control_shown = True
                self._line(f"migrator: control socket {p.control} (migrator status | cancel | set)")
            if p.settled is not None:
                self._line(format_settled(p.settled, p.downtime_target_ms))
            elif self.live:
                out.write("\r" + format_live(p) + ERASE)
                self._showing = True
        out.flush()

    def _line(self, text: str) -> None:
        prefix = "\r" + ERASE if self._showing else ""
        self.stream.write(prefix + text + "\n")
        self._showing = False

    def close(self) -> None:
        """Clear the live line, so what is printed next starts on a clean line."""
        if self._showing:
            self.stream.write("\r" + ERASE)
            self.stream.flush()
            self._showing = False
