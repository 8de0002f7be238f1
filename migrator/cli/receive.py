"""Receive live migrations: for each one start a restore-mode guest, apply, verify, resume.

Sources must prove a token, loopback included. Without ``--token-file`` it is this user's token
file (``$XDG_RUNTIME_DIR/migrator/token``, else ``~/.local/state/migrator/token``), made on first
use: a ``migrate`` of the same user on this host finds it, a source on another host needs a copy
(the path is printed). ``--insecure`` turns authentication off, on loopback and unix sockets only.
Connections still in their handshake are capped (``--max-handshakes``, in all and per peer): past
a cap the oldest waiting one is closed. A Layout larger than ``--max-size`` or than the memory
available now is refused before a restore guest starts. Needs ptrace rights over the restore
guests it starts (it is their parent, so the default Yama ptrace_scope 1 allows it). ``--tls-cert``/``--tls-key`` make every connection TLS
(sources then need ``--tls-ca`` or ``--tls``); TLS encrypts, the token still says who may send.

``--prepare SIZE`` starts a restore guest of SIZE bytes before any migration arrives and faults
its memory in, as QEMU's destination is started with ``-incoming`` and ``-mem-prealloc``: a
migration of that size then neither waits for a guest to start nor pays for fresh memory while
it receives. The line "prepared a ... restore guest" says when it is ready.

The receiving itself is ``migrator.api.receive``; this module parses options, says where the
token is, saves reports and turns failures into the exit status.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import trio

from .. import api
from ..api import HandshakeLimits, MigratorError, ReceiveSettings, control_path, server_context
from ..core.errors import TransportError
from ..core.tokens import ensure_default_token
from ..transport.net import HANDSHAKE_TIMEOUT_S
from .render import check_outputs, save_report
from . import exits, interrupts, options


_LIMITS = HandshakeLimits()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on (or unix:PATH)")
    options.add_token_options(parser, receiver=True)
    parser.add_argument("--max-size", type=options.size, default=ReceiveSettings.max_bytes, metavar="SIZE",
                        help="refuse migrations of guests larger than this (default 64G); larger than the memory "
                             "available when the migration arrives is refused too")
    parser.add_argument("--max-handshakes", type=_count, default=_LIMITS.total, metavar="N",
                        help=f"connections that may wait to authenticate at once (default {_LIMITS.total}); "
                             "past it the oldest waiting one is closed")
    parser.add_argument("--max-handshakes-per-peer", type=_count, default=_LIMITS.per_peer, metavar="N",
                        help=f"the same from one address (an IPv6 /64; on a unix socket, one user) (default {_LIMITS.per_peer})")
    parser.add_argument("--handshake-timeout", type=_seconds, default=HANDSHAKE_TIMEOUT_S, metavar="S",
                        help=f"close a connection that has not finished its handshake this long (default {HANDSHAKE_TIMEOUT_S:g})")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="encrypt with TLS: this server's certificate chain (PEM); it must name the host or IP address "
                             "sources connect to (an IP needs an IP subjectAltName). Needs --tls-key")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM, unencrypted)")
    parser.add_argument("--report", metavar="dest.json", help="write each migration's destination report here")
    parser.add_argument("--once", action="store_true", help="exit after the first migration (status says how it went)")
    parser.add_argument("--private", action="store_true",
                        help="restore guests on private memory, written across processes (one copy more); by default "
                             "they are on a shared memfd and pages are received in place (post-copy always gets a private one)")
    parser.add_argument("--control-dir", metavar="DIR",
                        help="where restore guests' control sockets are made (default: a new temporary directory, "
                             "removed at exit unless a resumed guest's socket is still in it)")
    parser.add_argument("--prepare", type=options.guest_size, metavar="SIZE",
                        help="keep a restore guest of SIZE (e.g. 1G) started and populated ahead of the migration")
    parser.add_argument("--recover-timeout", type=options.non_negative, default=600.0, metavar="S",
                        help="a post-copy whose source went away after its commit waits this long, from the break, for "
                             "a session resuming it: its migrator reconnecting by itself, or an operator's migrate --resume "
                             "(its guest pauses on its next missing page meanwhile; a refused attempt does not end the "
                             "wait; 0: fail at once; default 600)")
    parser.add_argument("--idle-timeout", type=options.positive, default=120.0, metavar="S", help="fail a migration whose source is silent this long (past a post-copy commit: wait for a "
                             "session resuming it instead, --recover-timeout; default 120)")


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"expected a positive number of seconds, not {text!r}")
    return value


_count = options.option_type(_positive_int)
_seconds = options.option_type(_positive_seconds)


def _log(line: str) -> None:
    print(f"migrator receive: {line}", file=sys.stderr, flush=True)


def _token(args: argparse.Namespace) -> tuple[bytes | None, str | None]:
    """The token sources must prove (None with ``--insecure``), and the line to say about it
    (none for a ``--token-file``: the operator knows where that is)."""
    if args.insecure:
        return None, "authentication off (--insecure): any local user who can connect may send pages"
    if args.token_file is not None:
        return options.read_token(args.token_file), None
    path, token, created = ensure_default_token()
    return token, (f"token {path} ({'new' if created else 'existing'}): sources of this user on this host use it; "
                   "a source on another host needs a copy (--token-file)")


def run(args: argparse.Namespace) -> int:
    with exits.preflight():
        check_outputs(report=args.report)
    settings = ReceiveSettings(memfd=not args.private, control_dir=args.control_dir, idle_timeout_s=args.idle_timeout, recover_timeout_s=args.recover_timeout,
                               max_bytes=args.max_size)
    limits = HandshakeLimits(total=args.max_handshakes, per_peer=args.max_handshakes_per_peer)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise TransportError("--tls-cert and --tls-key go together: give both, or neither for plain TCP")
    tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert is not None else None
    token, token_line = _token(args)
    control = control_path(f"receive-{os.getpid()}")
    failures: list[MigratorError] = []

    def on_report(report) -> None:
        if args.report:
            try:
                save_report(report.to_dict(), args.report)
            except MigratorError as exc:     # the next migration may still be written
                _log(f"report not written: {exc}")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(
                api.receive, args.listen, settings, token=token, tls=tls, once=args.once, on_report=on_report,
                log=_log, on_failure=failures.append, prepare=args.prepare, control=control, limits=limits,
                handshake_timeout=args.handshake_timeout, frame_macs=args.frame_macs))
            if token_line is not None:
                _log(token_line)
            _log(f"control socket {control}, listening on {bound}")   # the address last: scripts read it there

    interrupts.run(main)
    return 1 if failures else 0
