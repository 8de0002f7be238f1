"""Restore a guest from a checkpoint image: start a restore-mode guest, apply the chain from its
full base up to --dir, check the page digests and the guest's deep self-check, then resume it.
A truncated or corrupted image, or a missing parent, is refused (naming the file and offset)
and nothing is resumed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

from . import exits, interrupts
from .options import read_token
from .render import check_outputs, save_report
from ..checkpoint.restore import RestoreSettings, restore_chain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, metavar="D", help="the image to restore (its parents are found from it)")
    parser.add_argument("--control-dir", metavar="DIR",
                        help="where the restored guest's control socket goes (default: a new temp dir, removed "
                             "again if the restore fails)")
    parser.add_argument("--memfd", action="store_true", help="restore guest on a shared memfd (one copy fewer)")
    parser.add_argument("--token-file", metavar="F", help="the key the image was written with")
    parser.add_argument("--report", metavar="R.json")


def run(args: argparse.Namespace) -> int:
    with exits.preflight():
        check_outputs(report=args.report)
    token = read_token(args.token_file)
    made_dir = None if args.control_dir else tempfile.mkdtemp(prefix="migrator-")
    settings = RestoreSettings(token=token, control_dir=args.control_dir or made_dir, memfd=args.memfd)
    try:
        report = interrupts.run(lambda: restore_chain(args.dir, settings, log=lambda line: None))
    finally:
        if made_dir is not None:
            with contextlib.suppress(OSError):   # not empty: the restored guest's socket is in it
                os.rmdir(made_dir)
    if args.report:
        save_report(report.to_dict(), args.report)
    print(f"restored {report.image} ({len(report.chain)} image(s), {report.pages_applied} pages): "
          f"digests and self-check OK; guest pid {report.guest_pid} running, control {report.guest_control}")
    return 0
