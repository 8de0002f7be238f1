"""Timeouts that say what ran out of time.

``trio.fail_after`` raises a bare ``TooSlowError``, which reaches the user as "timed out". A
migration has several clocks (handshake, each round, the switch-over, a silent peer), and an
operator needs to know which one fired and which option sets it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from .errors import DeadlineExceeded


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[trio.CancelScope]:
    """``trio.fail_after(seconds)``, raising DeadlineExceeded("{what} took more than N s")."""
    try:
        with trio.fail_after(seconds) as scope:
            yield scope
    except trio.TooSlowError:
        raise DeadlineExceeded(f"{what} took more than {seconds:g} s") from None
