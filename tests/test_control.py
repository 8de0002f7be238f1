"""The control socket against a real migration: status from another client within 0.5 s and
agreeing with the report, set bandwidth= taking effect at the next round, cancel resuming the
source and discarding the destination's copy; and hostile requests."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import trio

from migrator.core.errors import MigrationFailed, MigratorError
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.tracker.features import wp_async_missing
from migrator.transport.control import Request, find_one, request, serve_control
from test_e2e_loopback import _receiver

MiB = 1 << 20


async def ask(path: str, req: dict) -> tuple[dict, float]:
    t = time.perf_counter()
    reply = await trio.to_thread.run_sync(request, path, req)
    return reply, time.perf_counter() - t


async def wait_round(migration: SourceMigration, number: int) -> None:
    while migration.latest is None or migration.latest.round < number or migration.latest.phase != "precopy":
        await trio.sleep(0.05)


@pytest.mark.skipif(wp_async_missing() is not None, reason=f"needs userfaultfd WP_ASYNC: {wp_async_missing()}")
async def test_status_set_and_cancel_a_real_migration(sockdir):
    path = os.path.join(sockdir, "ctl.sock")
    outcomes: list[dict] = []
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=4000) as guest:
        await trio.sleep(0.3)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                address = await _receiver(nursery, outcomes)
                migration = SourceMigration(guest.control, address, MigrateSettings(bandwidth=32 * MiB, max_rounds=30),
                                            control=path)

                async def operate():
                    await wait_round(migration, 0)
                    while True:              # until round 0 is seen sending
                        reply, took = await ask(path, {"op": "status"})
                        assert took < 0.5 and reply["ok"]
                        assert reply["status"]["round"] == 0 and reply["status"]["phase"] == "precopy"
                        if reply["status"]["round_sent_bytes"] > 0:
                            break
                        await trio.sleep(0.1)
                    assert reply["parameters"]["bandwidth"] == 32 * MiB
                    reply, _ = await ask(path, {"op": "set", "bandwidth": 8 * MiB, "downtime_ms": 1})
                    assert reply["pending"] == {"bandwidth": 8 * MiB, "downtime_ms": 1.0}
                    await wait_round(migration, 1)
                    await trio.sleep(0.5)
                    during_1, _ = await ask(path, {"op": "status"})
                    await wait_round(migration, 2)
                    await ask(path, {"op": "cancel"})
                    return during_1

                result = []
                async def run_operate():
                    result.append(await operate())

                nursery.start_soon(run_operate)
                with pytest.raises(MigrationFailed, match="cancelled") as failed:
                    await migration.run()
                assert not failed.value.committed
                nursery.cancel_scope.cancel()
        assert guest.alive()
        with guest.client() as client:
            before = client.stats()["steps"]
            time.sleep(0.3)
            assert client.stats()["steps"] > before, "the source guest runs on"
    report = migration.report
    assert outcomes and outcomes[0]["result"] == "discarded"
    assert report.error == "cancelled (migrator cancel)" and report.settings.bandwidth == 8 * MiB
    assert not os.path.exists(path), "the control socket is removed"
    r1 = report.rounds[1]
    assert all(r.scan_s > 0 for r in report.rounds), "every round bills the scan that found its pages"
    assert r1.bytes_wire / r1.duration_s == pytest.approx(8 * MiB, rel=0.1), "the new cap holds from round 1"
    # The token bucket starts full, so a round may run a burst's worth above its cap: the point is
    # that round 0 ran near the old cap, far above the new one.
    r0_rate = report.rounds[0].bytes_wire / report.rounds[0].duration_s
    assert 16 * MiB < r0_rate <= 32 * MiB * 1.15, "round 0 had the old cap"
    status = result[0]["status"]
    assert status["round"] == 1
    assert status["dirty_rate"] == report.rounds[0].dirty_rate
    assert status["expected_downtime_ms"] == report.rounds[0].expected_downtime_ms
    assert status["downtime_target_ms"] == 1.0


async def test_hostile_requests_get_one_line_and_the_endpoint_keeps_answering(sockdir):
    path = os.path.join(sockdir, "migrate-1.sock")
    asked: list[Request] = []

    def handler(req: Request) -> dict:
        asked.append(req)
        return {"seen": req.op}

    def raw(data: bytes) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return json.loads(s.makefile().readline())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, handler)
            for data, error in [
                (b"\x80\x00pickle\n", "a request is one JSON object on one line"),
                (b"[1, 2]\n", "expected object, got array"),
                (b'{"op": "reboot"}\n', "'op': invalid enum value 'reboot'"),
                (b'{"op": "set", "max_rounds": "7"}\n', "'max_rounds': expected int | null, got str"),
                (b"x" * 5000, "at most 4096 bytes"),
            ]:
                reply = await trio.to_thread.run_sync(raw, data)
                assert reply["ok"] is False and error in reply["error"], (data[:20], reply)
            assert asked == []
            assert (await trio.to_thread.run_sync(request, path, {"op": "status"}))["seen"] == "status"
            assert await trio.to_thread.run_sync(find_one, sockdir) == path
            nursery.cancel_scope.cancel()
    assert not os.path.exists(path)
    with pytest.raises(MigratorError, match="no running migrate or receive"):
        find_one(sockdir)


@pytest.mark.skipif(wp_async_missing() is not None, reason=f"needs userfaultfd WP_ASYNC: {wp_async_missing()}")
def test_the_commands_status_and_set_from_another_terminal(sockdir):
    import subprocess
    import sys

    from test_documents import Receiver, migrator

    control = os.path.join(sockdir, "m.sock")
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=32 * MiB, dirty_rate=1000) as guest:
        receiver = Receiver("--control-dir", sockdir, once=False)
        try:
            receiver_control = receiver.control
            migrate = subprocess.Popen(
                [sys.executable, "-m", "migrator", "migrate", "--guest", guest.control, "--to", receiver.address,
                 "--bandwidth", "4M", "--control", control], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            receiver.wait_for("into restore guest pid")
            shown = migrator("status", "--control", control, "--json", timeout=10)
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout)["status"]["phase"] == "precopy"
            text = migrator("status", "--control", control, timeout=10).stdout
            assert " round " in text and "bandwidth 4000000 B/s" in text     # round 0 may be over under load
            shown = migrator("status", "--control", receiver_control, "--json", timeout=10)
            assert [m["peer"].startswith("127.0.0.1") for m in json.loads(shown.stdout)["migrations"]] == [True]
            refused = migrator("cancel", "--control", receiver_control, timeout=10)
            assert refused.returncode == 1 and "a receiver answers status only" in refused.stderr
            changed = migrator("set", "--control", control, "bandwidth=unlimited", "max-rounds=3", timeout=10)
            assert changed.returncode == 0 and "takes effect at the next round" in changed.stdout, changed.stderr
            stdout, stderr = migrate.communicate(timeout=60)
            assert migrate.returncode == 0, stderr
            assert f"migrator: control socket {control}" in stderr
            resumed = receiver.wait_for(r"resumed guest pid \d+, control (\S+)").group(1)
            reply = json.loads(migrator("status", "--control", receiver_control, "--json", timeout=10).stdout)
            assert reply["migrations"] == [] and [r["guest_control"] for r in reply["resumed"]] == [resumed]
        finally:
            receiver.kill()
    from migrator.guest.client import GuestClient
    with GuestClient(resumed) as client:
        client.quit()
