"""Receive live migrations: for each one start a restore-mode guest, apply, verify, resume.

Listening on a non-loopback address requires ``--token-file`` (a pre-shared secret both sides
hold). Needs ptrace rights over the restore guests it starts (it is their parent, so the
default Yama ptrace_scope 1 allows it).
"""

from __future__ import annotations

import argparse
import functools
import sys

import trio

from ..errors import MigratorError
from ..report import save_report
from ..source.cli import read_token
from ..transport import serve
from .engine import DestinationMigration, ReceiveSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on (or unix:PATH)")
    parser.add_argument("--token-file", metavar="F")
    parser.add_argument("--report", metavar="dest.json", help="write each migration's destination report here")
    parser.add_argument("--once", action="store_true", help="exit after the first migration (status says how it went)")
    parser.add_argument("--memfd", action="store_true", help="restore guests on a shared memfd (one copy fewer)")
    parser.add_argument("--control-dir", metavar="DIR", help="where restore guests' control sockets are made")
    parser.add_argument("--idle-timeout", type=float, default=120.0, metavar="S", help="fail a migration whose source is silent this long (default 120)")


def _log(line: str) -> None:
    print(f"migrator receive: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    settings = ReceiveSettings(memfd=args.memfd, control_dir=args.control_dir, idle_timeout_s=args.idle_timeout)
    token = read_token(args.token_file)
    outcome: list[bool] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def handle(channel) -> None:
                migration = DestinationMigration(channel, settings, log=_log)
                try:
                    await migration.run()
                    outcome.append(True)
                except MigratorError as exc:
                    _log(f"migration failed: {exc}")
                    outcome.append(False)
                finally:
                    if args.report and getattr(migration, "report", None) is not None:
                        save_report(migration.report, args.report)
                    if args.once:
                        nursery.cancel_scope.cancel()

            bound = await nursery.start(functools.partial(serve, args.listen, handle, token=token))
            _log(f"listening on {bound}")

    trio.run(main)
    return 0 if all(outcome) else 1
