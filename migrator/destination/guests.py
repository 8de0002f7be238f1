"""Restore guests: started on demand, or prepared before the migration that will use them.

A restore guest is a child process whose fresh memory receives the incoming pages. Starting one
takes 0.1-0.2 s (a Python process); faulting its memory in takes far longer on this VM, where
the host backs memory on first touch and free page reporting hands freed memory back: 0.4 to
2.5 s of CPU per GiB. Started when the Layout arrives, that work competes with round 0.

QEMU's destination is started with ``-incoming`` before the migration, its RAM allocated, and
with ``-mem-prealloc`` faulted in. ``RestoreGuests(prepare=SIZE)`` does the same: the task
``keep_prepared`` starts one restore guest of SIZE bytes, waits until it has faulted its memory
in, and opens it as a ``RestoreTarget`` (control connection, layout, and its memory as this
process writes it: for a memfd guest, the shared mapping with every page mapped here too). The
next migration of that size takes it, and the task prepares the next one. A migration of
another size gets a target started on demand.

Every target ends one of two ways: ``release`` (resumed: the guest runs on its own, and is
reaped when it exits, so a receiver that keeps running collects no zombies) or ``close``
(killed, its control socket removed). ``RestoreGuests.close`` ends the targets that met neither,
for a receiver whose migrations' own cleanup was cut short (it is stopping).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..core.errors import GuestError
from ..guest.client import GuestClient
from ..guest.spawn import GuestProcess, spawn_guest
from ..core.model import MemoryLayout
from ..tracker.memory import MemfdMemory, ProcessMemory

POPULATED_POLL_S = 0.05
# restore guests' socket names, unique in this process: two RestoreGuests may share a control directory
_NAMES = itertools.count()


@dataclass
class RestoreTarget:
    """A restore guest opened for receiving: its process, control connection, layout, memory."""

    guest: GuestProcess
    client: GuestClient
    layout: MemoryLayout
    memory: ProcessMemory | MemfdMemory
    prepared: bool
    settled: bool = False       # released or closed

    def release(self) -> None:
        """Let go of a guest that now runs on its own: its control connection, its mapping;
        it is reaped when it exits."""
        self._let_go()
        self.guest.reap_when_it_exits()

    def close(self) -> None:
        """Kill the guest and let go of it (a target nobody resumed)."""
        self.guest.kill()
        self._let_go()

    def _let_go(self) -> None:
        self.settled = True
        self.client.close()
        if isinstance(self.memory, MemfdMemory):
            self.memory.close()


class RestoreGuests:
    def __init__(
        self,
        control_dir: str,
        *,
        memfd: bool = True,
        prepare: int | None = None,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.control_dir = control_dir
        self.memfd = memfd
        self.prepare = prepare
        self._log = log
        self._prepared: RestoreTarget | None = None
        self._starting: trio.Event | None = None    # set when the prepared guest's start ended
        self._taken = trio.Event()
        self._targets: list[RestoreTarget] = []      # targets opened, perhaps not yet settled
        self._targets_lock = threading.Lock()        # targets are opened in worker threads

    def close(self) -> None:
        """Kill every restore guest that was neither resumed (released) nor closed."""
        with self._targets_lock:
            targets, self._targets = self._targets, []
        for target in targets:
            if not target.settled:
                target.close()

    async def take(self, size: int, *, memfd: bool | None = None) -> RestoreTarget:
        """A restore target of ``size`` bytes (``prepared`` says whether it was made ahead), on a
        memfd or not (default: as this receiver's guests are); the prepared guest serves only a
        take of its size and kind."""
        memfd = self.memfd if memfd is None else memfd
        if size == self.prepare and memfd == self.memfd:
            if self._starting is not None:
                await self._starting.wait()
            target, self._prepared = self._prepared, None
            if target is not None and target.guest.alive():
                self._taken.set()
                return target
        return await trio.to_thread.run_sync(self._open, size, False, memfd)

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
                target = self._prepared = await trio.to_thread.run_sync(self._open, self.prepare, True)
            finally:
                self._starting.set()
                self._starting = None
            try:
                if await self._wait_populated(target):
                    self._log(f"prepared a {self.prepare >> 20} MiB restore guest "
                              f"(pid {target.guest.pid}) in {time.perf_counter() - started:.2f} s")
                await self._taken.wait()
            finally:
                if self._prepared is not None:        # cancelled before anyone took it
                    target, self._prepared = self._prepared, None
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(target.close)
            if not again:
                return

    async def _wait_populated(self, target: RestoreTarget) -> bool:
        """Poll until the guest's memory is faulted in, then map a memfd guest's pages here
        too; False if the target was taken before that."""
        while self._prepared is target:
            stats = await trio.to_thread.run_sync(target.client.stats)
            if stats.get("populated", True):
                if isinstance(target.memory, MemfdMemory):
                    await trio.to_thread.run_sync(target.memory.populate)
                return True
            with trio.move_on_after(POPULATED_POLL_S):
                await self._taken.wait()
        return False

    def _open(self, size: int, prepared: bool, memfd: bool | None = None) -> RestoreTarget:
        """Start a restore guest and open it for receiving (blocking: a worker thread)."""
        memfd = self.memfd if memfd is None else memfd
        control = os.path.join(self.control_dir, f"restore-{os.getpid()}-{next(_NAMES)}.sock")
        try:
            guest = spawn_guest(control, size=size, dirty_rate=None, restore=True, memfd=memfd)
        except GuestError as exc:
            raise GuestError(f"cannot start a restore guest of {size >> 20} MiB: {exc}") from exc
        try:
            client = guest.client()
            attachment = client.attach("none")
            layout = attachment.layout
            memory = (MemfdMemory(attachment.memfd, layout.regions, layout.page_size, writable=True)
                      if attachment.memfd is not None else ProcessMemory(layout.pid, layout.page_size))
        except BaseException:
            guest.kill()
            raise
        target = RestoreTarget(guest, client, layout, memory, prepared)
        with self._targets_lock:
            self._targets = [t for t in self._targets if not t.settled] + [target]
        return target
