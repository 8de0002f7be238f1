"""Print a migration report's round table and summary, and optionally plot it.

The exit code says whether the report could be read, not how the migration ended: scripts read
``result`` from ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys

from .render import check_outputs, format_round_table, format_summary, load_report, plot_report, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", help="report JSON written by `migrate --report` or `receive --report`")
    parser.add_argument("--plot", metavar="PNG", help="draw dirty pages, bandwidth and downtime per round to this image")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    check_outputs(plot=args.plot)
    report = load_report(args.report)
    if args.json:
        print(json.dumps(summarize(report)))
    else:
        print(format_round_table(report), format_summary(report), sep="\n\n")
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
