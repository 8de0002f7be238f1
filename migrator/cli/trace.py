"""Summarise a trace file written by ``migrator track --record`` (``migrator trace show TRACE``).

Prints the recorded process, how long the attach stopped it, the dirty rate and working set,
what could not be tracked, and one line per interval; ``--json`` prints the same summary as
``migrator track --json`` writes it. A file that is not a valid trace is refused in one line.
"""

from __future__ import annotations

import argparse
import json

from ..trace.file import read_trace
from ..trace.model import interval_pages
from ..trace.summary import live_line, summarize, untracked_lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="summarise a trace", description="summarise a trace file")
    show.add_argument("trace", metavar="TRACE")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.add_argument("--intervals", action="store_true", help="also print one line per interval")


def run(args: argparse.Namespace) -> int:
    trace = read_trace(args.trace)
    summary = summarize(trace)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"trace of process {trace.pid} {trace.command}".rstrip())
    print(f"  {len(trace.intervals)} intervals of {trace.interval_s:g} s over {summary['duration_s']:.2f} s; "
          f"attach stopped it {trace.stopped_ms:.3f} ms")
    print(f"  dirty rate {summary['dirty_rate']:.1f} pages/s ({summary['dirty_mb_s']:.2f} MB/s), "
          f"working set {summary['wss_pages']} pages of {summary['tracked_pages']} tracked "
          f"({trace.page_size}-byte pages), {len(trace.mappings)} mappings seen")
    for line in untracked_lines(trace):
        print(f"  {line}")
    if args.intervals:
        seen: set[int] = set()
        for interval in trace.intervals:
            seen |= interval_pages(interval, trace.page_size)
            print(live_line(trace.mappings, trace.page_size, interval, len(seen)))
    return 0
