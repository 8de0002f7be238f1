"""Live-migrate a running guest to a receiver (``migrator receive``).

Needs: the guest's control socket (the guest hands over its userfaultfd there), ptrace-read
rights over the guest (same user and ptrace_scope 0, or CAP_SYS_PTRACE) for PAGEMAP_SCAN and
process_vm_readv, and a kernel with userfaultfd WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+) for the
default tracker (see ``migrator probe``). ``--tls-ca``/``--tls`` encrypt the links (the receiver
then needs ``--tls-cert``/``--tls-key``).
"""

from __future__ import annotations

import argparse
import sys

import trio

from ..tracker import TRACKERS
from ..transport import check_tls_address, client_context, parse_address
from .engine import MigrateSettings, SourceMigration


def parse_rate(text: str) -> float:
    """'100M' / '1G' / '1gbit' / '500mbit' / '12345' -> bytes per second."""
    t = text.strip().lower()
    bits = t.endswith("bit")
    if bits:
        t = t[:-3]
    t = t.rstrip("b/s") if not bits else t
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}
    factor = 1.0
    if t and t[-1] in scale:
        factor, t = scale[t[-1]], t[:-1]
    try:
        value = float(t) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (examples: 100M, 1G, 500mbit)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"rate must be positive: {text!r}")
    return value / 8 if bits else value


def parse_compress(text: str) -> str:
    if text == "none" or (text.startswith("zstd:") and text[5:].lstrip("-").isdigit()) or text == "zstd":
        return "zstd:1" if text == "zstd" else text
    raise argparse.ArgumentTypeError(f"--compress takes zstd:LEVEL or none, not {text!r}")


def read_token(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as exc:
        raise SystemExit(f"migrator: cannot read token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise SystemExit(f"migrator: token file {path} holds {len(token)} bytes; use at least 16")
    return token


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guest", required=True, metavar="SOCKET", help="the guest's control socket")
    parser.add_argument("--to", required=True, metavar="HOST:PORT", help="receiver address (or unix:PATH)")
    parser.add_argument("--downtime-ms", type=float, default=50.0, help="downtime target: switch over once the expected downtime is within 90 %% of it (default 50)")
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--bandwidth", type=parse_rate, default=None, metavar="RATE", help="cap the link, e.g. 100M (bytes/s) or 1gbit")
    parser.add_argument("--compress", type=parse_compress, default="zstd:1", metavar="zstd:LEVEL|none")
    parser.add_argument("--streams", type=int, default=1, help="parallel connections (compression on more cores)")
    parser.add_argument("--tracker", choices=TRACKERS, default="wp-async")
    parser.add_argument("--verify", choices=("pages", "full"), default="pages")
    parser.add_argument("--force-switchover", action="store_true", help="switch over instead of throttling when not converging")
    parser.add_argument("--keep-source", action="store_true", help="keep the source guest frozen after commit instead of killing it")
    parser.add_argument("--token-file", metavar="F")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--tls-ca", metavar="FILE",
                     help="encrypt with TLS; the receiver's certificate must chain to FILE (a CA bundle, or the receiver's "
                          "self-signed certificate) and name the host or IP address of --to (an IP needs an IP subjectAltName)")
    tls.add_argument("--tls", action="store_true",
                     help="encrypt with TLS, verifying the receiver's certificate against the system's CAs")
    parser.add_argument("--report", metavar="run.json", help="write the JSON report here")
    parser.add_argument("--plot", metavar="out.png", help="also draw the report (needs matplotlib)")
    parser.add_argument("--round-timeout", type=float, default=300.0, metavar="S", help="fail (and resume the source) if a round or the switch-over takes longer (default 300)")
    parser.add_argument("--quiet", action="store_true", help="no per-round lines")


def run(args: argparse.Namespace) -> int:
    from .. import report as rep

    settings = MigrateSettings(
        downtime_ms=args.downtime_ms, max_rounds=args.max_rounds, bandwidth=args.bandwidth,
        compress=args.compress, streams=args.streams, tracker=args.tracker, verify=args.verify,
        force_switchover=args.force_switchover, keep_source=args.keep_source,
        token=read_token(args.token_file), round_timeout_s=args.round_timeout,
        tls=client_context(args.tls_ca) if args.tls_ca or args.tls else None,
    )
    check_tls_address(parse_address(args.to), settings.tls)
    show = (lambda stats: None) if args.quiet else (lambda stats: print(rep.format_round_line(stats), file=sys.stderr, flush=True))
    migration = SourceMigration(args.guest, args.to, settings, on_round=show)
    try:
        report = trio.run(migration.run)
    finally:
        if args.report and getattr(migration, "report", None) is not None:
            rep.save_report(migration.report, args.report)
    print(rep.format_round_table(report))
    print(rep.format_summary(report))
    if args.plot:
        rep.plot_report(report, args.plot)
    return 0 if report["verified"] else 1
