"""Helpers shared by the tracker tests (plain functions and classes; fixtures are in conftest)."""

from __future__ import annotations

import mmap

import pytest

from migrator.core.model import Region, Run
from migrator.tracker import _sys

PAGE = mmap.PAGESIZE


def need(reason: str | None) -> None:
    if reason:
        pytest.skip(reason)


def pages_of(runs: list[Run], base: int) -> list[int]:
    """Runs -> sorted page indices relative to ``base`` (tests only: small sets)."""
    return [(address - base) // PAGE + i for address, count in runs for i in range(count)]


def assert_coalesced(runs: list[Run]) -> None:
    """Sorted, positive, and no two runs touching or overlapping."""
    for address, count in runs:
        assert count >= 1 and address % PAGE == 0
    for (a, n), (b, _) in zip(runs, runs[1:]):
        assert a + n * PAGE < b, f"runs {a:#x}+{n} and {b:#x} touch or overlap"


class OwnMemory:
    """A private anonymous mapping of the test process itself, with its address and region."""

    def __init__(self, pages: int) -> None:
        self.map = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.pages = pages
        self.start = _sys.buffer_address(self.map)
        self.region = Region(self.start, pages * PAGE)

    def write(self, pages, value: int = 7) -> None:
        for page in pages:
            self.map[page * PAGE] = value

    def read(self, pages) -> None:
        for page in pages:
            self.map[page * PAGE]

    def close(self) -> None:
        self.map.close()
