"""Live migration end to end: real guests, real kernel tracking, loopback TCP."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from migrator.destination.engine import DestinationMigration, ReceiveSettings
from migrator.core.errors import MigrationFailed
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings, SourceMigration
from harness.faultproxy import FaultProxy, Faults
from migrator.core.tokens import load_default_token
from migrator.transport import serve

MiB = 1 << 20


async def _receiver(nursery, outcomes, settings=ReceiveSettings(), token: bytes | None = None):
    async def handle(channel):
        migration = DestinationMigration(channel, settings, log=lambda line: None)
        try:
            outcomes.append((await migration.run()).to_dict())
        except MigrationFailed:
            outcomes.append(migration.report.to_dict())

    return await nursery.start(functools.partial(serve, "127.0.0.1:0", handle, token=token))


def _listening(receiver: subprocess.Popen) -> str:
    """The address a ``migrator receive`` child listens on, from its "listening on" line."""
    for line in receiver.stderr:
        if "listening on " in line:
            return line.strip().rsplit(" ", 1)[-1]
    raise AssertionError(f"the receiver exited with status {receiver.wait()} before listening")


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _assert_advances(guest_client, seconds=0.5):
    before = guest_client.stats()["steps"]
    time.sleep(seconds)
    after = guest_client.stats()["steps"]
    assert after > before, "guest is not running"


@pytest.mark.parametrize(
    "tracker, memfd, verify, extra",
    [
        ("wp-async", False, "pages", {}),
        ("wp-async", False, "full", {}),
        ("wp-async", True, "full", {}),
        ("wp-async", True, "pages", {"compress": "none"}),
        ("sync-wp", False, "full", {}),
        ("full", False, "full", {"max_rounds": 2, "force_switchover": True}),
    ],
)
async def test_migration_converges_verifies_and_resumes(sockdir, tracker, memfd, verify, extra):
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=2000, fill="text", memfd=memfd) as guest:
        await trio.sleep(0.3)
        outcomes: list[dict] = []
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                # a shared guest over an authenticated loopback link: no payload tags, pages lent
                token = os.urandom(32) if memfd else None
                address = await _receiver(nursery, outcomes, ReceiveSettings(control_dir=sockdir, memfd=memfd), token)
                settings = MigrateSettings(verify=verify, downtime_ms=50, tracker=tracker, token=token, **extra)
                report = (await SourceMigration(guest.control, address, settings).run()).to_dict()
                nursery.cancel_scope.cancel()
        assert report["verified"] and report["result"] == "committed"
        assert report["settings"]["tracker"] == tracker
        assert report["rule"] == ("max-rounds" if tracker == "full" else "downtime-target")
        assert ("region_digest" in report["downtime_parts_ms"]) == (verify == "full")
        assert len(report["rounds"]) >= 1 and report["rounds"][0]["dirty_pages"] > 0
        # a shared guest's pages go from its memory in place while it writes, where nothing tags
        # or compresses them (an authenticated loopback link, --compress none): the digests agree
        lends = memfd and extra.get("compress") == "none"
        assert (report["pages_lent"] > 0) == lends and report["pages_lent"] <= report["pages_sent"]
        dest = outcomes[0]
        assert dest["result"] == "resumed"
        # inside the downtime the guest checks what the final copy wrote, unless --verify full
        assert dest["self_check"] == ("region" if verify == "full" else "final copy")
        # the source guest is gone, the destination guest runs and passes its self-check
        for _ in range(50):
            if not guest.alive():
                break
            time.sleep(0.1)
        assert not guest.alive()
        from migrator.guest.client import GuestClient

        client = GuestClient(dest["guest_control"])
        try:
            _assert_advances(client)
            assert client.check()["clean"]
        finally:
            client.quit()


async def test_receiver_killed_mid_round_leaves_source_running(sockdir):
    receiver = subprocess.Popen(
        [sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0", "--once", "--control-dir", sockdir],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        address = _listening(receiver)
        with spawn_guest(os.path.join(sockdir, "src.sock"), size=128 * MiB, dirty_rate=5000, fill="random") as guest:
            client = guest.client()
            digest_before = client.digest()

            async def kill_receiver_soon():
                await trio.sleep(1.0)
                receiver.send_signal(signal.SIGKILL)

            settings = MigrateSettings(bandwidth=20 * MiB, downtime_ms=1, token=load_default_token())
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kill_receiver_soon)
                    with pytest.raises(MigrationFailed) as failure:
                        await SourceMigration(guest.control, address, settings).run()
            assert not failure.value.committed
            assert guest.alive()
            _assert_advances(client)
            assert client.digest() != digest_before
            assert client.check()["clean"]
    finally:
        receiver.kill()
        receiver.wait()


async def test_corrupted_frame_aborts_and_source_resumes(sockdir):
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=2000, fill="random") as guest:
        outcomes: list[dict] = []
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                address = await _receiver(nursery, outcomes, ReceiveSettings(control_dir=sockdir))
                proxy = FaultProxy("127.0.0.1", _port(address), Faults(corrupt_at=3 * MiB + 12345))
                port = await nursery.start(proxy.serve)
                with pytest.raises(MigrationFailed) as failure:
                    await SourceMigration(guest.control, f"127.0.0.1:{port}", MigrateSettings()).run()
                nursery.cancel_scope.cancel()
        assert not failure.value.committed
        assert outcomes and outcomes[0]["result"] == "discarded"
        client = guest.client()
        _assert_advances(client)
        assert client.check()["clean"]
