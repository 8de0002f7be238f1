"""Option types and values several commands share: sizes, rates, compression, tokens.

Each type turns the library's ``ValueError`` into argparse's error, so a bad value is one line
naming the option (``migrator migrate: error: argument --bandwidth: not a rate: 'x'``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from ..core import units
from ..guest.layout import parse_size as parse_guest_size

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
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as exc:
        raise SystemExit(f"migrator: cannot read token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise SystemExit(f"migrator: token file {path} holds {len(token)} bytes; use at least 16")
    return token
