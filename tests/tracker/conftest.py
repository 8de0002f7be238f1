"""Fixtures for the tracker tests: real memory, real uffds, real child processes.

Kernel-dependent tests skip with a reason naming the missing kernel feature (the reasons come
from ``migrator.tracker.features``, which tries each feature on scratch memory).
"""

from __future__ import annotations

import pytest
from tracker_helpers import OwnMemory, need

from migrator.tracker import features
from migrator.tracker.scratch import ScratchProcess


@pytest.fixture
def need_wp_async() -> None:
    need(features.wp_async_missing())


@pytest.fixture
def need_sync_wp() -> None:
    need(features.sync_wp_missing() or features.pagemap_scan_missing())


@pytest.fixture
def own_memory():
    """Factory of private mappings in the test process, unmapped at the end."""
    made: list[OwnMemory] = []

    def make(pages: int) -> OwnMemory:
        made.append(OwnMemory(pages))
        return made[-1]

    yield make
    for memory in made:
        memory.close()


@pytest.fixture
def scratch():
    """Factory of scratch child processes (see migrator.tracker.scratch), stopped at the end."""
    made: list[ScratchProcess] = []

    def make(size: int, mode: str = "async", **kwargs) -> ScratchProcess:
        made.append(ScratchProcess(size, mode, **kwargs))
        return made[-1]

    yield make
    for process in made:
        process.close()
