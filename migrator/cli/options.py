"""Option types and values several commands share: sizes, rates, counts, durations, tokens.

Each type turns the library's ``ValueError`` into argparse's error, so a bad value is one line
naming the option (``migrator migrate: error: argument --bandwidth: not a rate: 'x'``) before
anything runs, never a traceback from a settings constructor.
"""

from __future__ import annotations

import argparse
import math
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


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"expected a positive number, not {text!r}")
    return value


def _whole_number(text: str, least: int, most: int | None = None) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = least - 1
    if value < least or (most is not None and value > most):
        wanted = f"{least}..{most}" if most is not None else f"at least {least}"
        raise ValueError(f"expected a whole number {wanted}, not {text!r}")
    return value


def _count(text: str) -> int:
    return _whole_number(text, 1)


def _streams(text: str) -> int:
    from ..transport.net import MAX_STREAMS     # here: ``migrator guest`` starts without trio

    return _whole_number(text, 1, MAX_STREAMS)


positive = option_type(_positive_number)          # milliseconds, seconds, rates: > 0 and finite


def _non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"expected a number >= 0, not {text!r}")
    return value


non_negative = option_type(_non_negative_number)  # seconds that may be 0 (off)
count = option_type(_count)                       # rounds, images, repeats: 1 or more
streams = option_type(_streams)                   # parallel connections: 1..MAX_STREAMS


def _compress(text: str) -> str:
    from ..core.errors import ProtocolError
    from ..protocol import Compression      # here: ``migrator guest`` need not load the codec

    try:
        level = Compression.parse(text).level
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    return "none" if level is None else f"zstd:{level}"


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
    parser.add_argument("--frame-macs", action="store_true",
                        help="a MAC on every frame even where the link looks protected (loopback, a unix socket, "
                             "TLS), which then carries checksums: for a relay that forwards loopback in clear")


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


def _postcopy_after(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return _whole_number(text, 1)
    except ValueError:
        raise ValueError(f"expected a number of rounds (at least 1) or auto, not {text!r}") from None


postcopy_after = option_type(_postcopy_after)    # --postcopy-after N|auto
