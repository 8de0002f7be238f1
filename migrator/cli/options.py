"""Option types and values several commands share: sizes, rates, compression, tokens.

Each type turns the library's ``ValueError`` into argparse's error, so a bad value is one line
naming the option (``migrator migrate: error: argument --bandwidth: not a rate: 'x'``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from ..core import units
from ..core.errors import TransportError
from ..guest.layout import parse_size as parse_guest_size
from ..core.tokens import load_default_token, read_token_file

T = TypeVar("T")


def option_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse type: its ValueError becomes the option's one-line error."""

    def parsed(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parsed.__name__ = getattr(parse, "__name__", "value")
    return parsed


size = option_type(units.parse_size)              # any whole number of pages: 64M, 1G
guest_size = option_type(parse_guest_size)        # a guest region: at least 16 pages
rate = option_type(units.parse_rate)              # bytes/s: 100M, 1G, 500mbit


def _compress(text: str) -> str:
    if text == "zstd":
        return "zstd:1"
    if text == "none" or (text.startswith("zstd:") and text[5:].lstrip("-").isdigit()):
        return text
    raise ValueError(f"takes zstd:LEVEL or none, not {text!r}")


compress = option_type(_compress)


def read_token(path: str | None) -> bytes | None:
    """The shared secret in ``path`` (surrounding white space dropped), or None without a path."""
    if path is None:
        return None
    try:
        return read_token_file(path)
    except TransportError as exc:
        raise SystemExit(f"migrator: {exc}") from None


def add_token_options(parser: argparse.ArgumentParser, *, receiver: bool) -> None:
    """``--token-file F`` or ``--insecure`` (never both) for the two ends of a live migration."""
    group = parser.add_mutually_exclusive_group()
    if receiver:
        group.add_argument("--token-file", metavar="F",
                           help="the token sources must prove (at least 16 bytes); default: this user's token file, "
                                "made on first use (its path is printed)")
        group.add_argument("--insecure", action="store_true",
                           help="no authentication: any local user who can connect may send pages (loopback and unix "
                                "sockets only; sources need --insecure too)")
    else:
        group.add_argument("--token-file", metavar="F",
                           help="the receiver's token; default: this user's token file, which a receiver on this "
                                "host made (for another host, copy its file)")
        group.add_argument("--insecure", action="store_true",
                           help="no authentication, for a receiver started with --insecure")


def source_token(args: argparse.Namespace) -> bytes | None:
    """The token ``migrate`` proves: ``--token-file``, else this user's default one; None with
    ``--insecure``."""
    if args.insecure:
        return None
    if args.token_file is not None:
        return read_token(args.token_file)
    try:
        return load_default_token()
    except TransportError as exc:
        raise SystemExit(f"migrator: {exc}") from None
