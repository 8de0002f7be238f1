"""Change a running migration's parameters; they take effect when the round in progress ends.

``bandwidth=RATE`` (e.g. 100M bytes/s, 1gbit, or ``unlimited``) caps the link; ``downtime-ms=N``
is the new downtime target; ``max-rounds=N`` the new round limit.
"""

from __future__ import annotations

import argparse

from . import exits
from .control import add_control_argument, ask, parse_assignments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_control_argument(parser)
    parser.add_argument("assignments", nargs="+", metavar="NAME=VALUE",
                        help="bandwidth=RATE|unlimited, downtime-ms=N, max-rounds=N")


def run(args: argparse.Namespace) -> int:
    with exits.preflight():
        req = parse_assignments(args.assignments)
    reply = ask(args, req)
    changes = ", ".join(f"{name}={value}" for name, value in reply["pending"].items())
    print(f"set {changes}: takes effect at the next round")
    return 0
