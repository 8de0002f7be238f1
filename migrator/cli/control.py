"""``migrator status``, ``cancel`` and ``set``: talk to a running migrate's (or receive's) control
socket from another terminal. Without ``--control`` they find the one running command of this
user (``transport.control.find_one``); the socket's path is also in ``migrate``'s first progress
line and in its report."""

from __future__ import annotations

import argparse

from ..core import units
from ..core.errors import MigratorError
from ..transport.control import find_one, request
from . import exits, options
from .progress import format_live


def add_control_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="SOCKET",
                        help="the control socket (default: the one running migrate or receive of this user)")


def ask(args: argparse.Namespace, req: dict) -> dict:
    with exits.preflight():
        path = args.control or find_one(kinds=("migrate", "receive") if req["op"] == "status" else ("migrate",))
    return request(path, req)


def parse_assignments(items: list[str]) -> dict:
    """``bandwidth=RATE downtime-ms=N max-rounds=N`` as a set request; MigratorError naming a bad one."""
    parsers = {"bandwidth": lambda v: "unlimited" if v == "unlimited" else units.parse_rate(v),
               "downtime-ms": options._positive_number, "max-rounds": options._count}
    req: dict = {"op": "set"}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in parsers:
            raise MigratorError(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(parsers)}")
        try:
            req[name.replace("-", "_")] = parsers[name](value)
        except ValueError as exc:
            raise MigratorError(f"{name}: {exc}") from None
    if len(req) == 1:
        raise MigratorError("nothing to set: give bandwidth=RATE, downtime-ms=N or max-rounds=N")
    return req


def format_status(reply: dict) -> str:
    from ..core.documents import convert
    from ..source.progress import Progress

    if "migrations" in reply:       # a receiver
        lines = [f"receiving: {len(reply['migrations'])} in progress, {len(reply['resumed'])} resumed"]
        lines += [f"  {m['id'] or '-'} from {m['peer']}: {m['state']}" for m in reply["migrations"]]
        lines += [f"  resumed {r['id'] or '-'}: guest pid {r['guest_pid']}, control {r['guest_control']}" for r in reply["resumed"]]
        return "\n".join(lines)
    progress = convert(Progress, reply["status"])
    params = reply["parameters"]
    bandwidth = "unlimited" if params["bandwidth"] is None else f"{params['bandwidth']:.0f} B/s"
    pending = f"; pending {reply['pending']}" if reply.get("pending") else ""
    return (f"{format_live(progress)}\nmigration {progress.id}: bandwidth {bandwidth}, downtime target "
            f"{params['downtime_ms']:g} ms, max rounds {params['max_rounds']}{pending}")
