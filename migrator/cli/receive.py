"""Receive live migrations: for each one start a restore-mode guest, apply, verify, resume.

Listening on a non-loopback address requires ``--token-file`` (a pre-shared secret both sides
hold). Needs ptrace rights over the restore guests it starts (it is their parent, so the
default Yama ptrace_scope 1 allows it). ``--tls-cert``/``--tls-key`` make every connection TLS
(sources then need ``--tls-ca`` or ``--tls``); TLS encrypts, the token still says who may send.

``--prepare SIZE`` starts a restore guest of SIZE bytes before any migration arrives and faults
its memory in, as QEMU's destination is started with ``-incoming`` and ``-mem-prealloc``: a
migration of that size then neither waits for a guest to start nor pays for fresh memory while
it receives. The line "prepared a ... restore guest" says when it is ready.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile

import trio

from ..core.errors import MigratorError, TransportError
from .render import check_outputs, save_report
from . import exits, interrupts, options
from ..transport import serve, server_context
from ..destination.engine import DestinationMigration, ReceiveSettings
from ..destination.guests import RestoreGuests
from ..destination.status import Receiving
from ..transport.control import control_path, serve_control


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on (or unix:PATH)")
    parser.add_argument("--token-file", metavar="F",
                        help="the secret sources must hold (required off loopback; make one with "
                             "`head -c 32 /dev/urandom | base64 > F`)")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="encrypt with TLS: this server's certificate chain (PEM); it must name the host or IP address "
                             "sources connect to (an IP needs an IP subjectAltName). Needs --tls-key")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM, unencrypted)")
    parser.add_argument("--report", metavar="dest.json", help="write each migration's destination report here")
    parser.add_argument("--once", action="store_true", help="exit after the first migration (status says how it went)")
    parser.add_argument("--memfd", action="store_true", help="restore guests on a shared memfd (one copy fewer)")
    parser.add_argument("--control-dir", metavar="DIR",
                        help="where restore guests' control sockets are made (default: a new temporary directory, "
                             "removed at exit unless a resumed guest's socket is still in it)")
    parser.add_argument("--prepare", type=options.guest_size, metavar="SIZE",
                        help="keep a restore guest of SIZE (e.g. 1G) started and populated ahead of the migration")
    parser.add_argument("--idle-timeout", type=options.positive, default=120.0, metavar="S", help="fail a migration whose source is silent this long (default 120)")


def _log(line: str) -> None:
    print(f"migrator receive: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    with exits.preflight():
        check_outputs(report=args.report)
    settings = ReceiveSettings(memfd=args.memfd, control_dir=args.control_dir, idle_timeout_s=args.idle_timeout)
    token = options.read_token(args.token_file)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise TransportError("--tls-cert and --tls-key go together: give both, or neither for plain TCP")
    tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert is not None else None
    outcome: list[bool] = []
    made_dir = None if args.control_dir else tempfile.mkdtemp(prefix="migrator-")
    guests = RestoreGuests(args.control_dir or made_dir, memfd=args.memfd, prepare=args.prepare, log=_log)
    receiving = Receiving()

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def handle(channel) -> None:
                migration = DestinationMigration(channel, settings, log=_log, guests=guests)
                receiving.started(migration)
                try:
                    await migration.run()
                    outcome.append(True)
                except MigratorError as exc:
                    _log(f"migration failed: {exc}")
                    outcome.append(False)
                finally:
                    receiving.ended(migration)
                    if args.report and getattr(migration, "report", None) is not None:
                        try:
                            save_report(migration.report.to_dict(), args.report)
                        except MigratorError as exc:     # the next migration may still be written
                            _log(f"report not written: {exc}")
                    if args.once:
                        nursery.cancel_scope.cancel()

            bound = await nursery.start(functools.partial(serve, args.listen, handle, token=token, tls=tls))
            control = await nursery.start(serve_control, control_path(f"receive-{os.getpid()}"), receiving.answer)
            _log(f"control socket {control}, listening on {bound}")   # the address last: scripts read it there
            nursery.start_soon(functools.partial(guests.keep_prepared, again=not args.once))

    try:
        interrupts.run(main)
    finally:
        guests.close()      # restore guests nobody resumed or killed (the engine's cleanup was cut short)
        if made_dir is not None:
            with contextlib.suppress(OSError):   # not empty: a resumed guest's socket is in it
                os.rmdir(made_dir)
    return 0 if all(outcome) else 1
