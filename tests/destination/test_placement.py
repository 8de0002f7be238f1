"""Restore guests on a memfd receive raw batches in place; private ones, and post-copy's, do not."""

import functools
import os

import pytest
import trio

from migrator.core.errors import MigrationFailed
from migrator.destination.engine import DestinationMigration, ReceiveSettings
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.transport import serve

MiB = 1 << 20
PAGES = 64 * MiB // 4096


async def migrate(sockdir: str, receive: ReceiveSettings, settings: MigrateSettings, fill: str = "random"):
    outcomes: list[dict] = []

    async def handle(channel):
        migration = DestinationMigration(channel, receive, log=lambda line: None)
        try:
            outcomes.append((await migration.run()).to_dict())
        except MigrationFailed:
            outcomes.append(migration.report.to_dict())

    with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=2000, fill=fill) as guest:
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                address = await nursery.start(functools.partial(serve, "127.0.0.1:0", handle, token=None))
                report = (await SourceMigration(guest.control, address, settings).run()).to_dict()
                nursery.cancel_scope.cancel()
    return report, outcomes[0]


def check_resumed(dest: dict) -> None:
    with GuestClient(dest["guest_control"]) as client:
        assert client.check()["clean"]
        client.quit()


async def test_a_memfd_restore_guest_receives_round_zero_in_place(sockdir):
    report, dest = await migrate(sockdir, ReceiveSettings(control_dir=sockdir), MigrateSettings(compress="none"))
    assert report["verified"] and dest["result"] == "resumed"
    assert dest["pages_placed"] >= PAGES, "every page of round 0 (batches of one run) lands in place"
    assert dest["pages_placed"] <= dest["pages_applied"]
    check_resumed(dest)


async def test_compressed_batches_still_go_through_a_buffer(sockdir):
    report, dest = await migrate(sockdir, ReceiveSettings(control_dir=sockdir), MigrateSettings(), fill="text")
    assert report["verified"] and dest["result"] == "resumed"
    assert dest["pages_placed"] < dest["pages_applied"] // 10
    check_resumed(dest)


async def test_a_private_restore_guest_is_written_across_processes(sockdir):
    report, dest = await migrate(sockdir, ReceiveSettings(control_dir=sockdir, memfd=False), MigrateSettings(compress="none"))
    assert report["verified"] and dest["result"] == "resumed"
    assert dest["pages_placed"] == 0 and dest["pages_applied"] >= PAGES
    check_resumed(dest)


@pytest.mark.parametrize("postcopy", [{"postcopy_after": 0}, {"postcopy_auto": True}])
async def test_a_post_copy_session_gets_a_private_guest_from_a_memfd_receiver(sockdir, postcopy):
    """Also a hybrid that converged before it had to switch: the guest was chosen at the Layout."""
    report, dest = await migrate(sockdir, ReceiveSettings(control_dir=sockdir),
                                 MigrateSettings(compress="none", **postcopy))
    assert report["verified"] and dest["result"] == "resumed"
    assert (dest["postcopy"] is not None) == ("postcopy_after" in postcopy)
    assert dest["pages_placed"] == 0, "nothing is placed into a guest that may fault its pages in"
    check_resumed(dest)
