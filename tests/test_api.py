"""The public API (``migrator.api``, re-exported lazily by ``migrator``): cheap to import, and a
real migration driven through it alone: receive, Migration, watch."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import trio

import migrator
from migrator.guest.spawn import spawn_guest
from migrator.tracker.features import wp_async_missing

MiB = 1 << 20


def test_import_migrator_loads_neither_trio_nor_the_engines():
    code = ("import sys, json, migrator; print(json.dumps([m for m in ('trio', 'migrator.api', 'migrator.source') "
            "if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []
    assert migrator.Migration is migrator.api.Migration and "receive" in dir(migrator)
    with pytest.raises(AttributeError):
        migrator.no_such_thing


@pytest.mark.skipif(wp_async_missing() is not None, reason=f"needs userfaultfd WP_ASYNC: {wp_async_missing()}")
async def test_a_migration_through_the_api_alone(sockdir):
    reports = []
    seen = []
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=16 * MiB, dirty_rate=1000) as guest:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                address = await nursery.start(lambda task_status: migrator.receive(
                    "127.0.0.1:0", migrator.ReceiveSettings(control_dir=sockdir), once=True,
                    on_report=reports.append, task_status=task_status))
                migration = migrator.Migration(guest.control, address, migrator.MigrateSettings(bandwidth=32 * MiB))

                async def watch():
                    async for progress in migration.watch():
                        seen.append(progress)

                nursery.start_soon(watch)
                await trio.sleep(0)             # the watcher is subscribed before the run starts
                report = await migration.run()
    assert isinstance(report, migrator.MigrationReport) and report.result == "committed"
    assert [r.result for r in reports] == ["resumed"] and reports[0].id == report.id
    assert seen and seen[-1].phase == "committed"
    assert [p.settled for p in seen if p.settled] == list(report.rounds)
    from migrator.guest.client import GuestClient
    with GuestClient(reports[0].guest_control) as client:
        client.quit()


@pytest.mark.skipif(wp_async_missing() is not None, reason=f"needs userfaultfd WP_ASYNC: {wp_async_missing()}")
async def test_a_receiver_with_a_control_socket_and_a_prepared_guest_through_the_api_alone(sockdir):
    """What ``migrator receive --prepare --token-file`` does, written against ``migrator`` only:
    the migration lands in the prepared guest and the receiver's control socket answers status
    during it (the migration, applying pages) and after (the guest it resumed)."""
    token = os.urandom(32)
    control = os.path.join(sockdir, "receiver.sock")
    reports, failures, lines, during = [], [], [], []
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=16 * MiB, dirty_rate=1000) as guest:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                address = await nursery.start(functools.partial(
                    migrator.receive, "127.0.0.1:0", migrator.ReceiveSettings(control_dir=sockdir), token=token,
                    prepare=16 * MiB, control=control, on_report=reports.append, on_failure=failures.append,
                    log=lines.append))
                idle = await trio.to_thread.run_sync(migrator.control_request, control, {"op": "status"})
                migration = migrator.Migration(guest.control, address,
                                               migrator.MigrateSettings(token=token, bandwidth=8 * MiB))

                async def ask_while_applying():
                    while not during:
                        reply = await trio.to_thread.run_sync(migrator.control_request, control, {"op": "status"})
                        if reply["migrations"] and reply["migrations"][0]["pages_applied"] > 0:
                            during.append(reply)
                        await trio.sleep(0.05)

                nursery.start_soon(ask_while_applying)
                report = await migration.run()
                while not reports:      # the source is done once resumed; the receiver's own end follows
                    await trio.sleep(0.01)
                after = await trio.to_thread.run_sync(migrator.control_request, control, {"op": "status"})
                nursery.cancel_scope.cancel()
    assert idle["migrations"] == [] and idle["resumed"] == []
    assert report.result == "committed" and report.verified and not failures
    assert report.settings.frame_macs is False, "loopback with a token: proven in the handshake, checksummed frames"
    [dest] = reports
    assert dest.result == "resumed" and dest.id == report.id and dest.restore_guest == "prepared"
    [applying] = during[0]["migrations"]
    assert applying["id"] == report.id and applying["peer"].startswith("127.0.0.1")
    assert after["migrations"] == [] and after["resumed"] == [
        {"id": report.id, "guest_pid": dest.guest_pid, "guest_control": dest.guest_control}]
    assert any(f"resumed guest pid {dest.guest_pid}" in line for line in lines)
    assert not os.path.exists(control), "the control socket ends with the receiver"
    from migrator.guest.client import GuestClient
    with GuestClient(dest.guest_control) as client:
        assert client.check()["clean"]
        client.quit()
