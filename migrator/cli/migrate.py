"""Live-migrate a running guest to a receiver (``migrator receive``).

Needs: the guest's control socket (the guest hands over its userfaultfd there), ptrace-read
rights over the guest (same user and ptrace_scope 0, or CAP_SYS_PTRACE) for PAGEMAP_SCAN and
process_vm_readv, and a kernel with userfaultfd WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+) for the
default tracker (see ``migrator probe``). ``--tls-ca``/``--tls`` encrypt the links (the receiver
then needs ``--tls-cert``/``--tls-key``). Without ``--token-file`` the token is this user's token
file, which a ``migrator receive`` of the same user on this host made; ``--insecure`` goes
without, to a receiver started with ``--insecure``.

``--resume ID`` finishes a post-copy that lost its source after the commit (its migrator died,
or gave up: ``--recover-timeout``): it reads the frozen guest's state file, sends what the
receiver still lacks, verifies, and only then kills the source guest (``source.resume``).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..core.errors import MigratorError
from ..tracker import TRACKERS
from ..transport import check_tls_address, client_context, parse_address
from ..transport.control import control_dir
from ..source.migration import MigrateSettings, SourceMigration
from ..source.resume import ResumedPostcopy, ResumeSettings
from . import exits, interrupts, options
from .progress import ProgressView


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guest", required=True, metavar="SOCKET", help="the guest's control socket")
    parser.add_argument("--resume", metavar="MIGRATION_ID",
                        help="finish a post-copy interrupted after its commit (its migrator died or gave up): the source "
                             "guest is frozen, the receiver at --to waits for it (receive --recover-timeout). Sends the "
                             "pages the receiver lacks, verifies every page, then kills the source guest; on any failure "
                             "it stays frozen for another try. The id is in the failed run's last line and report, and in "
                             "SOCKET.state beside the guest's socket. Pre-copy and post-copy options do not apply")
    parser.add_argument("--to", required=True, metavar="HOST:PORT", help="receiver address (or unix:PATH)")
    parser.add_argument("--downtime-ms", type=options.positive, default=50.0, help="downtime target: switch over once the expected downtime is within 90 %% of it (default 50)")
    parser.add_argument("--max-rounds", type=options.count, default=30, help="switch over (or fail) after this many pre-copy rounds (default 30)")
    parser.add_argument("--bandwidth", type=options.rate, default=None, metavar="RATE", help="cap the link, e.g. 100M (bytes/s) or 1gbit")
    parser.add_argument("--compress", type=options.compress, default="zstd:1", metavar="zstd:LEVEL|none",
                        help="compress page batches that sample as compressible (default zstd:1)")
    parser.add_argument("--streams", type=options.streams, default=1, help="parallel connections to the one port (compression on more cores; default 1)")
    parser.add_argument("--tracker", choices=TRACKERS, default="wp-async",
                        help="how written pages are found (default wp-async; `migrator probe` says which work here)")
    parser.add_argument("--verify", choices=("pages", "full"), default="pages",
                        help="pages: compare per-page digests; full: also a digest of the whole frozen region (default pages)")
    parser.add_argument("--force-switchover", action="store_true", help="switch over instead of throttling when not converging")
    parser.add_argument("--switch-asap", action="store_true",
                        help="switch over as soon as the expected downtime fits the target (default: one more round "
                             "while each still halves it)")
    postcopy = parser.add_mutually_exclusive_group()
    postcopy.add_argument("--postcopy", action="store_true",
                          help="post-copy from the start: resume at the destination right after the first scan, "
                               "its pages follow on demand and in the background (the receiver needs userfaultfd)")
    postcopy.add_argument("--postcopy-after", type=options.postcopy_after, metavar="N|auto",
                          help="pre-copy first, then post-copy: after N rounds, or (auto) where pre-copy stalls and "
                               "would start throttling the guest; a pre-copy that converges still ends in stop-and-copy")
    parser.add_argument("--postcopy-timeout", type=options.positive, default=300.0, metavar="S",
                        help="fail (keeping the source frozen) if delivering the pages after a post-copy switch takes longer (default 300)")
    parser.add_argument("--recover-timeout", type=options.non_negative, default=30.0, metavar="S",
                        help="after a post-copy switch, reconnect this long when the link breaks, then finish (0: fail at once, "
                             "the source kept frozen; default 30)")
    parser.add_argument("--keep-source", action="store_true", help="keep the source guest frozen after commit instead of killing it")
    options.add_token_options(parser, receiver=False)
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--tls-ca", metavar="FILE",
                     help="encrypt with TLS; the receiver's certificate must chain to FILE (a CA bundle, or the receiver's "
                          "self-signed certificate) and name the host or IP address of --to (an IP needs an IP subjectAltName)")
    tls.add_argument("--tls", action="store_true",
                     help="encrypt with TLS, verifying the receiver's certificate against the system's CAs")
    parser.add_argument("--report", metavar="run.json", help="write the JSON report here")
    parser.add_argument("--plot", metavar="out.png", help="also draw the report (needs matplotlib)")
    parser.add_argument("--round-timeout", type=options.positive, default=300.0, metavar="S", help="fail (and resume the source) if a round takes longer (default 300)")
    parser.add_argument("--switchover-timeout", type=options.positive, default=None, metavar="S",
                        help="fail (and resume the source) if the switch-over, from the freeze to the commit, takes longer "
                             "(default: 40 times --downtime-ms, at least 2 s, plus 2 s per GiB with --verify full)")
    parser.add_argument("--control", metavar="SOCKET",
                        help="open the control socket (migrator status|cancel|set) here (default: in $XDG_RUNTIME_DIR/migrator "
                             "or /tmp/migrator-UID, named after the migration)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr (the table and summary are still printed)")
    parser.add_argument("--progress-json", action="store_true",
                        help="for programs: every progress snapshot (several a second, one per finished round) as a JSON "
                             "line on stdout, then the report document as the last line, instead of the text output")


def run(args: argparse.Namespace) -> int:
    if args.resume is not None:
        return _resume(args)
    from . import render as rep

    with exits.preflight():
        rep.check_outputs(report=args.report, plot=args.plot)
        settings = MigrateSettings(
            downtime_ms=args.downtime_ms, max_rounds=args.max_rounds, bandwidth=args.bandwidth,
            compress=args.compress, streams=args.streams, tracker=args.tracker, verify=args.verify,
            force_switchover=args.force_switchover, switch_asap=args.switch_asap, keep_source=args.keep_source,
            token=options.source_token(args), round_timeout_s=args.round_timeout,
            switchover_timeout_s=args.switchover_timeout,
            tls=client_context(args.tls_ca) if args.tls_ca or args.tls else None, frame_macs=args.frame_macs,
            postcopy_after=0 if args.postcopy else None if args.postcopy_after in (None, "auto") else args.postcopy_after,
            postcopy_auto=args.postcopy_after == "auto", postcopy_timeout_s=args.postcopy_timeout,
            recover_timeout_s=args.recover_timeout,
        )
        check_tls_address(parse_address(args.to), settings.tls)
        if args.control is None:
            control_dir()           # refused here, not mid-migration, if it is not safe
    if args.progress_json:
        view = ProgressView(sys.stdout, json_lines=True)
    else:
        view = None if args.quiet else ProgressView(sys.stderr, live=sys.stderr.isatty())
    migration = SourceMigration(args.guest, args.to, settings, on_progress=view, control=args.control or True)
    try:
        report = _run_saving_failure(migration, args.report)
    finally:
        if view is not None:
            view.close()
    if args.progress_json:
        print(json.dumps(report), flush=True)
    else:
        print(rep.format_round_table(report))
        print(rep.format_summary(report))
    # committed: the migration happened whatever becomes of its outputs (a warning, exit 0)
    if args.report:
        _write(rep.save_report, report, args.report)
    if args.plot:
        _write(rep.plot_report, report, args.plot)
    return exits.OK


def _resume(args: argparse.Namespace) -> int:
    """``--resume``: a thin layer over ``ResumedPostcopy``; a refusal exits 2, a failure 3 (the
    source stays frozen), as ``exits`` says."""
    from . import render as rep

    with exits.preflight():
        if args.postcopy or args.postcopy_after is not None or args.plot:
            raise MigratorError("--resume finishes the interrupted post-copy: --postcopy, --postcopy-after and --plot "
                                "do not apply")
        rep.check_outputs(report=args.report, plot=None)
        settings = ResumeSettings(
            token=options.source_token(args), tls=client_context(args.tls_ca) if args.tls_ca or args.tls else None,
            compress=args.compress, streams=args.streams, bandwidth=args.bandwidth, frame_macs=args.frame_macs,
            postcopy_timeout_s=args.postcopy_timeout, keep_source=args.keep_source,
        )
        check_tls_address(parse_address(args.to), settings.tls)
    quiet = args.quiet or args.progress_json
    log = (lambda line: None) if quiet else (lambda line: print(f"migrator: {line}", file=sys.stderr, flush=True))
    report = _run_saving_failure(ResumedPostcopy(args.guest, args.to, args.resume, settings, log=log), args.report)
    if args.progress_json:
        print(json.dumps(report), flush=True)
    else:
        print(rep.format_summary(report))
    if args.report:
        _write(rep.save_report, report, args.report)
    return exits.OK


def _run_saving_failure(job, path: str | None) -> dict:
    """``job.run()``'s report; a failed run's report (``job.report``) is written to ``path`` too."""
    from . import render as rep

    try:
        return interrupts.run(job.run).to_dict()
    except BaseException:
        if path and job.report is not None:
            _write(rep.save_report, job.report.to_dict(), path)
        raise


def _write(write, report: dict, path: str) -> None:
    try:
        write(report, path)
    except MigratorError as exc:
        exits.warn(f"{path} not written: {exc}")
