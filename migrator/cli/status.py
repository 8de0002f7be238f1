"""Show how far a running migration is (or what a receiver is doing), from another terminal.

The figures are the migration's latest progress snapshot (at most 0.2 s old): the same as its
live line, and those of a finished round are the report's. ``--json`` prints the reply as it
came (``status``: a ``migrator.progress`` document; ``parameters``; ``pending`` changes).
"""

from __future__ import annotations

import argparse
import json

from .control import add_control_argument, ask, format_status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_control_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the reply as one JSON object")


def run(args: argparse.Namespace) -> int:
    reply = ask(args, {"op": "status"})
    print(json.dumps(reply) if args.json else format_status(reply))
    return 0
