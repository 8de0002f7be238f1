"""Print a report's round table and summary (a migration or checkpoint), or its summary (a
receive or restore report), and optionally plot a migration's rounds.

``--json`` prints the report document itself, exactly as ``--report`` wrote it (its schema in
``docs/schemas/``), after checking it. The exit code says whether the report could be read
(0, or 2 for a bad file), not how the migration ended: scripts read ``result``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..core.errors import MigratorError
from . import exits
from .render import (
    ROUND_KINDS, check_outputs, format_receive_summary, format_round_table, format_summary, load_report,
    plot_report,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", help="a report JSON written by `migrate`, `checkpoint`, `receive` or `restore` --report")
    parser.add_argument("--plot", metavar="PNG", help="draw dirty pages, bandwidth and downtime per round to this image")
    parser.add_argument("--json", action="store_true", help="print the report document (checked) instead of text")


def run(args: argparse.Namespace) -> int:
    with exits.preflight():
        check_outputs(plot=args.plot)
        document = load_report(args.report).to_dict()
        if args.plot and document["kind"] not in ROUND_KINDS:
            raise MigratorError(f"{args.report}: a {document['kind']} report has no rounds to plot")
    if args.json:
        print(json.dumps(document))
    elif document["kind"] in ROUND_KINDS:
        print(format_round_table(document), format_summary(document), sep="\n\n")
    else:
        print(format_receive_summary(document))
    if args.plot:
        plot_report(document, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
