"""Restore guests: started on demand, or prepared before the migration that will use them.

A restore guest is a child process whose fresh memory receives the incoming pages. Starting one
takes 0.1-0.2 s (a Python process); faulting its memory in takes far longer on this VM, where
the host backs memory on first touch and free page reporting hands freed memory back: 0.4 to
2.5 s of CPU per GiB. Started when the Layout arrives, that work competes with round 0.

QEMU's destination is started with ``-incoming`` before the migration, its RAM allocated, and
with ``-mem-prealloc`` faulted in. ``RestoreGuests(prepare=SIZE)`` does the same: the task
``keep_prepared`` starts one restore guest of SIZE bytes and waits until it has faulted its
memory in; the next migration of that size takes it, and the task starts the next one. A
migration of another size gets a guest started on demand.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable

import trio

from ..errors import GuestError
from ..guest.spawn import GuestProcess, spawn_guest

POPULATED_POLL_S = 0.05


class RestoreGuests:
    def __init__(
        self,
        control_dir: str,
        *,
        memfd: bool = False,
        prepare: int | None = None,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.control_dir = control_dir
        self.memfd = memfd
        self.prepare = prepare
        self._log = log
        self._names = itertools.count()
        self._prepared: GuestProcess | None = None
        self._starting: trio.Event | None = None    # set when the prepared guest's start ended
        self._taken = trio.Event()

    async def take(self, size: int) -> tuple[GuestProcess, bool]:
        """A restore guest of ``size`` bytes, and whether it was prepared ahead."""
        if size == self.prepare:
            if self._starting is not None:
                await self._starting.wait()
            guest, self._prepared = self._prepared, None
            if guest is not None and guest.alive():
                self._taken.set()
                return guest, True
        return await trio.to_thread.run_sync(self._start, size), False

    async def keep_prepared(self, *, again: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Task: keep one guest of ``prepare`` bytes ready; once taken, prepare the next if
        ``again``. Reports started (``nursery.start``) once the first guest is starting, so a
        ``take`` from then on waits for it. A guest unclaimed when the task is cancelled is killed."""
        if self.prepare is None:
            task_status.started()
            return
        while True:
            started = time.perf_counter()
            self._starting, self._taken = trio.Event(), trio.Event()
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            try:
                self._prepared = await trio.to_thread.run_sync(self._start, self.prepare)
            finally:
                self._starting.set()
                self._starting = None
            try:
                if await self._wait_populated(self._prepared):
                    self._log(f"prepared a {self.prepare >> 20} MiB restore guest "
                              f"(pid {self._prepared.pid}) in {time.perf_counter() - started:.2f} s")
                await self._taken.wait()
            finally:
                if self._prepared is not None:        # cancelled before anyone took it
                    guest, self._prepared = self._prepared, None
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(guest.kill)
            if not again:
                return

    async def _wait_populated(self, guest: GuestProcess) -> bool:
        """Poll until the guest's memory is faulted in; False if it was taken before that."""
        client = await trio.to_thread.run_sync(guest.client)
        try:
            while self._prepared is guest:
                stats = await trio.to_thread.run_sync(client.stats)
                if stats.get("populated", True):
                    return True
                with trio.move_on_after(POPULATED_POLL_S):
                    await self._taken.wait()
            return False
        finally:
            client.close()

    def _start(self, size: int) -> GuestProcess:
        control = os.path.join(self.control_dir, f"restore-{os.getpid()}-{next(self._names)}.sock")
        try:
            return spawn_guest(control, size=size, dirty_rate=None, restore=True, memfd=self.memfd)
        except GuestError as exc:
            raise GuestError(f"cannot start a restore guest of {size >> 20} MiB: {exc}") from exc
