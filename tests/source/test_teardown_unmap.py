"""A shared guest's memory, attached for a migration, is unmapped by a thread its teardown
nursery owns: leaving does not wait for it, and the nursery does, cancelled or not."""

import os

import trio

from migrator.guest.spawn import spawn_guest
from migrator.source.attach import AttachedGuest

MiB = 1 << 20


def guest_mapped() -> bool:
    """Whether this process maps a guest's memfd (its maps name it ``/memfd:migrator-guest``)."""
    with open("/proc/self/maps") as maps:
        return "/memfd:migrator-guest" in maps.read()


async def test_the_unmap_is_left_to_the_teardown_nursery_and_done_when_it_ends(sockdir):
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 * MiB, memfd=True) as guest:
        with trio.fail_after(30):
            async with trio.open_nursery() as teardown:
                async with AttachedGuest(guest.control, "wp-async", teardown=teardown) as attached:
                    assert type(attached.memory).__name__ == "MemfdMemory" and guest_mapped()
            assert not guest_mapped(), "the nursery waited for the unmap"


async def test_a_cancelled_teardown_still_unmaps(sockdir):
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 * MiB, memfd=True) as guest:
        with trio.fail_after(30):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as teardown:
                    async with AttachedGuest(guest.control, "wp-async", teardown=teardown) as attached:
                        scope.cancel()
                        await trio.sleep(1)
            assert scope.cancelled_caught
            assert not guest_mapped(), "a cancelled migration's mapping does not outlive it"
            del attached      # held to here: its memory must be unmapped by the teardown, not collected


async def test_without_a_nursery_leaving_unmaps(sockdir):
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 * MiB, memfd=True) as guest:
        with trio.fail_after(30):
            async with AttachedGuest(guest.control, "wp-async"):
                assert guest_mapped()
            assert not guest_mapped()
