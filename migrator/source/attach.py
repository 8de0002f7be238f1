"""The guest, attached for one migration: its layout, a reader of its memory, a tracker, a throttle.

Attaching asks the guest (over its control socket) for its layout and its userfaultfd; closing
gives everything back in the order that keeps the guest safe: thaw it (unless the migration
committed, when it must never run again), stop the throttle, release the tracker, hang up.
"""

from __future__ import annotations

import trio

from ..core.model import MemoryLayout
from ..guest.client import GuestClient
from ..tracker import open_tracker, required_uffd_mode
from ..tracker.memory import MemfdMemory, ProcessMemory
from .throttle import Throttle


def attach_mode(tracker: str) -> str:
    """What a guest's ``attach`` must ask for so that ``tracker`` can run."""
    mode = required_uffd_mode(tracker)
    return {"async": "wp-async", "sync": "sync-wp", None: "none"}[mode]


class AttachedGuest:
    """Use as ``async with AttachedGuest(control, tracker) as guest``; ``committed`` decides
    whether leaving thaws the guest. ``teardown``: a nursery that takes the unmapping of a
    shared guest's memory, so that leaving does not wait for it (the kernel's teardown of a large
    mapping, tens of milliseconds after a migration that has ended); without one it is waited for."""

    def __init__(self, guest_control: str, tracker: str, *, teardown: trio.Nursery | None = None) -> None:
        self.guest_control = guest_control
        self.tracker_name = tracker
        self.committed = False
        self._teardown = teardown

    async def __aenter__(self) -> AttachedGuest:
        self.client = await trio.to_thread.run_sync(GuestClient, self.guest_control)
        try:
            attachment = await trio.to_thread.run_sync(self.client.attach, attach_mode(self.tracker_name))
        except BaseException:
            self.client.close()
            raise
        self.layout: MemoryLayout = attachment.layout
        self.memory = (
            MemfdMemory(attachment.memfd, self.layout.regions, self.layout.page_size)
            if attachment.memfd is not None
            else ProcessMemory(self.layout.pid, self.layout.page_size)
        )
        try:
            self.tracker = open_tracker(
                self.tracker_name, pid=self.layout.pid, regions=self.layout.regions, uffd=attachment.uffd,
                page_size=self.layout.page_size,
            )
            try:
                self.throttle = Throttle(self.layout.pid)
            except BaseException:
                await trio.to_thread.run_sync(self.tracker.close)
                raise
        except BaseException:
            self._hang_up()
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        try:
            if not self.committed:
                self.throttle.thaw()
            self.throttle.close()  # leaves the guest running unless it is frozen for good
            await trio.to_thread.run_sync(self.tracker.close)
        finally:
            self._hang_up()

    def _hang_up(self) -> None:
        self.client.close()
        if isinstance(self.memory, MemfdMemory):
            if self._teardown is None:
                self.memory.close()
            else:
                self._teardown.start_soon(_unmap, self.memory)

    async def set_tag(self, tag: str) -> None:
        await trio.to_thread.run_sync(self.client.set_tag, tag)

    def terminate(self) -> None:
        """Kill the source guest: after the commit its copy lives on elsewhere."""
        self.throttle.kill()


async def _unmap(memory: MemfdMemory) -> None:
    """A worker thread's unmapping of a shared guest's memory, finished even when the nursery
    that owns it is cancelled (a mapping must not outlive its migration)."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(memory.close)
