"""Show what a checkpoint image and its chain hold (like ``crit``): layout, chain, per-image page
counts, bytes raw and stored, compression ratio, digests, frozen time. --verify reads every byte
and checks every checksum and digest without restoring.
"""

from __future__ import annotations

import argparse
import json

from . import interrupts
from .options import read_token
from ..checkpoint.inspect import describe_chain, format_chain, verify_chain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="D", help="an image directory")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--verify", action="store_true", help="check every frame, payload and digest of the chain")
    parser.add_argument("--token-file", metavar="F", help="the key the image was written with")


def run(args: argparse.Namespace) -> int:
    info = describe_chain(args.dir)
    if args.verify:
        info["verify"] = interrupts.run(lambda: verify_chain(args.dir, token=read_token(args.token_file)))
    print(json.dumps(info, indent=1) if args.json else format_chain(info))
    return 0
