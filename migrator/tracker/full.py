"""``full``: no tracking at all; every populated page is reported every round (the baseline).

``collect`` is ``populated``: present or swapped pages, without never-touched ones and without
those mapped to the shared zero page. Needs only ptrace read rights over the guest.
"""

from __future__ import annotations

from ..core.model import Run
from ..core.runs import count_pages
from .base import TrackerBase


class FullTracker(TrackerBase):
    name = "full"

    def _arm(self) -> None:
        pass  # nothing to protect

    def _collect(self, within=None) -> tuple[list[Run], int]:
        runs = self._populated()
        return runs, count_pages(runs)
