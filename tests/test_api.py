"""The public API (``migrator.api``, re-exported lazily by ``migrator``): cheap to import, and a
real migration driven through it alone: receive, Migration, watch."""

from __future__ import annotations

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
