"""Sizes and rates as people write them: ``64M``, ``1GiB``, ``100M`` (bytes/s), ``1gbit``.

Pure functions raising ``ValueError`` with one line naming the text; the command line turns that
into its option error, the library (experiment grids) into its own.
"""

from __future__ import annotations

import re

from .model import PAGE_SIZE

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_RATE_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_size(text: str, *, min_pages: int = 1) -> int:
    """``"64M"``, ``"1G"``, ``"1GiB"``, ``"4096"`` -> bytes: binary units, a whole number of
    pages, at least ``min_pages`` of them."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r}: expected a number with an optional K/M/G/T suffix, e.g. 1G")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if size % PAGE_SIZE or size < min_pages * PAGE_SIZE:
        least = f"at least {min_pages} pages" if min_pages > 1 else "positive"
        raise ValueError(f"size {text!r}: must be a multiple of {PAGE_SIZE} and {least}")
    return size


def parse_rate(text: str) -> float:
    """``"100M"`` / ``"1G"`` / ``"12345"`` (bytes per second, decimal units, an optional ``B/s``)
    or ``"1gbit"`` / ``"500mbit"`` (bits per second) -> bytes per second."""
    t = text.strip().lower()
    bits = t.endswith("bit")
    t = t[:-3] if bits else t.rstrip("b/s")
    factor = 1.0
    if t and t[-1] in _RATE_UNITS:
        factor, t = _RATE_UNITS[t[-1]], t[:-1]
    try:
        value = float(t) * factor
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (examples: 100M, 1G, 500mbit)") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"rate must be positive: {text!r}")
    return value / 8 if bits else value
