"""Show how far a running migration is (or what a receiver is doing), from another terminal.

The figures are the migration's latest progress snapshot (at most 0.2 s old): the same as its
live line, and those of a finished round are the report's. ``--json`` prints the reply as it
came (``status``: a ``migrator.progress`` document; ``parameters``; ``pending`` changes).

``--guest SOCKET`` asks about a source guest instead, from its state file (a stopped guest answers
nothing on its socket): which migration committed it, and whether that was a post-copy that
``migrate --resume`` can finish (with the command that does).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..core.errors import ResumeRefused
from ..guest import committed
from ..source.resume import find_interrupted, resume_command
from .control import add_control_argument, ask, format_status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_control_argument(parser)
    parser.add_argument("--guest", metavar="SOCKET",
                        help="a source guest instead: which migration committed it (its state file, SOCKET.state) and, "
                             "for an interrupted post-copy, the migrate --resume command that finishes it")
    parser.add_argument("--json", action="store_true", help="print the reply as one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.guest is not None:
        return _guest(args)
    reply = ask(args, {"op": "status"})
    print(json.dumps(reply) if args.json else format_status(reply))
    return 0


def _guest(args: argparse.Namespace) -> int:
    record = committed.read_record(args.guest)
    try:
        interrupted = find_interrupted(args.guest)
        command, why = resume_command(interrupted.migration, args.guest, interrupted.destination), None
    except ResumeRefused as exc:
        command, why = None, str(exc)
    if args.json:
        print(json.dumps({"guest": args.guest, "committed": asdict(record) if record else None,
                          "resume": command, "not_resumable": why}))
    elif command is not None:
        print(f"guest {args.guest}: {record.describe()}, interrupted and frozen; finish it with (and the token "
              f"and TLS options it used):\n  {command}")
    else:
        print(f"guest {args.guest}: {record.describe() + '; ' if record else ''}nothing to resume: {why}")
    return 0
