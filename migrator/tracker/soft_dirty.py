"""``soft-dirty``: ``clear_refs`` 4 + pagemap bit 55, for kernels built with CONFIG_MEM_SOFT_DIRTY.

Needs no userfaultfd and no cooperation from the guest, but the kernel offers no atomic
"report and clear": a write landing between reading the bits and writing ``clear_refs`` would be
lost. So ``collect`` freezes the guest (SIGSTOP, waiting until every thread is stopped) around
read+clear, as CRIU's pre-dump does, unless it is already stopped, and resumes it only if it froze
it. Whoever else stops and continues the guest (a throttle) must not do so while ``collect`` runs.
A process cannot freeze itself, so the calling process cannot be tracked this way.

Bits are read with the classic 8-byte pagemap entries (``pagemap.flagged_runs``), which works on
the older kernels this tracker is for; only present or swapped pages count.

Needs: ptrace read rights over the guest (pagemap), write access to /proc/PID/clear_refs, the
right to signal it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

from ..core.errors import TrackerError, TrackerUnavailable
from ..core.model import Run
from ..core.runs import count_pages
from .base import TrackerBase
from .features import soft_dirty_missing
from .pagemap import flagged_runs

CLEAR_SOFT_DIRTY = b"4"
FREEZE_TIMEOUT_S = 2.0


def thread_states(pid: int) -> list[str]:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                states.append(stat.read().rpartition(")")[2].split()[0])
        except FileNotFoundError:
            continue  # the thread exited
    return states


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Keep every thread of ``pid`` stopped inside the block (no-op if it is stopped already)."""
    if all(state in "tT" for state in thread_states(pid)):
        yield
        return
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + FREEZE_TIMEOUT_S
        while not all(state in "tTXZ" for state in thread_states(pid)):
            if time.monotonic() > deadline:
                raise TrackerError(f"process {pid} did not stop within {FREEZE_TIMEOUT_S} s of SIGSTOP")
            time.sleep(0.0002)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class SoftDirtyTracker(TrackerBase):
    name = "soft-dirty"

    @staticmethod
    def kernel_missing() -> str | None:
        return soft_dirty_missing()

    def check_mode(self) -> None:
        if self.pid == os.getpid():
            raise TrackerUnavailable("soft-dirty must freeze the tracked process: it cannot track the calling process")
        self._clear_refs = os.open(f"/proc/{self.pid}/clear_refs", os.O_WRONLY | os.O_CLOEXEC)

    def _arm(self) -> None:
        os.write(self._clear_refs, CLEAR_SOFT_DIRTY)

    def _collect(self, within=None) -> tuple[list[Run], int]:
        # clear_refs clears the whole process: every region is read, whatever ``within`` asks
        with frozen(self.pid):
            runs = flagged_runs(self.pagemap_fd, self.regions, page_size=self.page_size, soft_dirty=True)
            os.write(self._clear_refs, CLEAR_SOFT_DIRTY)
        return runs, count_pages(runs)

    def _release(self) -> None:
        if hasattr(self, "_clear_refs"):
            os.close(self._clear_refs)
