"""Take a checkpoint image of a running guest (CRIU-style ``dump``), full or incremental.

Without --parent the image is full; with --parent P it holds only the pages written since image
P scanned the guest (refused if another image or migration scanned it since, unless
--full-if-needed). With --every S --keep N, --dir is a chain directory: an image every S seconds,
the oldest merged into its child so that N stay, each restorable. The guest is frozen only for the
final scan-and-copy; the frozen time is printed. Without --leave-running the guest is killed
once its image is safely on disk (like ``criu dump``).

Needs: the guest's control socket, ptrace-read rights over the guest (same user with
ptrace_scope 0, a parent, or CAP_SYS_PTRACE) and userfaultfd WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+).
"""

from __future__ import annotations

import argparse

from . import exits, interrupts, options
from .render import check_outputs, save_report
from ..checkpoint.chain import run_continuous
from ..checkpoint.engine import CheckpointSettings, take_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guest", required=True, metavar="SOCKET", help="the guest's control socket")
    parser.add_argument("--dir", required=True, metavar="D", help="the new image directory (with --every: the chain directory)")
    parser.add_argument("--parent", metavar="P", help="image to build on: an incremental image of the pages written since P")
    parser.add_argument("--leave-running", action="store_true", help="keep the guest running after the image (default: kill it)")
    parser.add_argument("--full-if-needed", action="store_true", help="take a full image when --parent did not scan the guest last")
    parser.add_argument("--every", type=options.positive, metavar="S", help="checkpoint continuously every S seconds (implies --leave-running)")
    parser.add_argument("--keep", type=options.count, default=3, metavar="N", help="with --every: images kept (older ones merged; default 3)")
    parser.add_argument("--count", type=options.count, metavar="K", help="with --every: stop after K images (default: until interrupted)")
    parser.add_argument("--downtime-ms", type=options.positive, default=20.0, help="pre-copy into the file until the frozen part is expected below this")
    parser.add_argument("--compress", type=options.compress, default="zstd:1", metavar="zstd:LEVEL|none")
    parser.add_argument("--token-file", metavar="F", help="MAC the image with this key (restore and inspect need it)")
    parser.add_argument("--report", metavar="R.json",
                        help="write the JSON report here (with --every: the list so far, rewritten after each image)")


def _line(report: dict) -> str:
    kind = report["image_kind"]
    note = f" (full: {report['parent_refused']})" if report.get("parent_refused") else ""
    pruned = f", merged away {len(report['pruned'])}" if report.get("pruned") else ""
    return (f"{report['image']}: {kind} image, {report['pages_sent']} pages, {report['bytes_wire']} bytes stored, "
            f"frozen {report['frozen_ms']:.2f} ms{note}{pruned}")


def run(args: argparse.Namespace) -> int:
    with exits.preflight():
        check_outputs(report=args.report)
    settings = CheckpointSettings(
        leave_running=args.leave_running or args.every is not None, full_if_needed=args.full_if_needed,
        downtime_ms=args.downtime_ms, compress=args.compress, token=options.read_token(args.token_file),
    )
    if args.every is not None:
        if args.parent:
            raise SystemExit("migrator checkpoint: --every continues the chain in --dir; do not give --parent")
        reports: list[dict] = []

        def show(report) -> None:     # an interrupted chain still leaves its reports
            line = report.to_dict()
            print(_line(line), flush=True)
            reports.append(line)
            if args.report:
                save_report(reports, args.report)

        interrupts.run(lambda: run_continuous(args.guest, args.dir, settings, every=args.every, keep=args.keep,
                                              count=args.count, on_image=show))
        return 0
    report = interrupts.run(lambda: take_checkpoint(args.guest, args.dir, settings, parent=args.parent)).to_dict()
    print(_line(report))
    if args.report:
        save_report(report, args.report)
    return 0
