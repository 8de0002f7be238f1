"""Cancel a running migration before its point of no return: the source guest resumes, the
destination discards its copy, and ``migrate`` exits 1 saying so. Refused once the switch-over
has begun."""

from __future__ import annotations

import argparse

from .control import add_control_argument, ask


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_control_argument(parser)


def run(args: argparse.Namespace) -> int:
    ask(args, {"op": "cancel"})
    print("cancelled: the source guest resumes")
    return 0
