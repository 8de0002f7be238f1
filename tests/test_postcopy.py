"""Post-copy and the hybrid end to end: real guests, userfaultfd on the real kernel, loopback TCP.

Every wait on a fault runs under ``trio.fail_after``: a page that never arrives fails the test
instead of hanging it.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from harness.faultproxy import FaultProxy, Faults
from migrator.core.errors import MigrationFailed
from migrator.core.tokens import ensure_default_token, load_default_token
from migrator.destination.engine import DestinationMigration, ReceiveSettings
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.transport import serve

MiB = 1 << 20
MODES = {
    "postcopy": {"postcopy_after": 0},
    "postcopy-2-streams": {"postcopy_after": 0, "streams": 2},   # the urgent link is a third
    "after-2": {"postcopy_after": 2, "downtime_ms": 1},
    "auto": {"postcopy_auto": True, "downtime_ms": 1},
    # an authenticated loopback link: the urgent link goes to the native fault loops
    "postcopy-native": {"postcopy_after": 0, "authenticated": True},
    "postcopy-2-streams-native": {"postcopy_after": 0, "streams": 2, "authenticated": True},
    "auto-native": {"postcopy_auto": True, "downtime_ms": 1, "authenticated": True},
}


async def _receiver(nursery, outcomes, sockdir, *, token=None, **settings):
    async def handle(channel):
        migration = DestinationMigration(channel, ReceiveSettings(control_dir=sockdir, **settings), log=lambda line: None)
        try:
            outcomes.append((await migration.run()).to_dict())
        except MigrationFailed:
            outcomes.append(migration.report.to_dict())

    return await nursery.start(functools.partial(serve, "127.0.0.1:0", handle, token=token))


def _settings(mode: str) -> tuple[dict, bytes | None]:
    """The migration's settings for ``mode`` and the token both ends use (None: --insecure)."""
    settings = dict(MODES[mode])
    token = ensure_default_token()[1] if settings.pop("authenticated", False) else None
    return {**settings, "token": token}, token


def _steps(client: GuestClient) -> int:
    return client.stats()["steps"]


def _advances(client: GuestClient, seconds: float = 0.3) -> bool:
    before = _steps(client)
    time.sleep(seconds)
    return _steps(client) > before


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


async def _migrate(guest, address, **settings) -> dict:
    return (await SourceMigration(guest.control, address, MigrateSettings(**settings)).run()).to_dict()


@pytest.mark.parametrize("mode", MODES)
async def test_postcopy_switches_delivers_every_page_and_the_guest_runs_on(sockdir, mode):
    """Each mode switches, delivers every stale page once (faulted or pushed), verifies the page
    digests, and leaves a destination guest that runs, passes its self-check, and can be
    migrated onward (its region is trackable with WP_ASYNC again)."""
    rate = None if mode.startswith("auto") else 5000
    settings, token = _settings(mode)
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=rate, fill="random") as guest:
        await trio.sleep(0.3)
        outcomes: list[dict] = []
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                address = await _receiver(nursery, outcomes, sockdir, token=token)
                report = await _migrate(guest, address, compress="none", **settings)
                nursery.cancel_scope.cancel()
        assert report["result"] == "committed" and report["verified"]
        pc = report["postcopy"]
        assert pc is not None, report["rule"]
        native = token is not None
        assert pc["native_faults"] is native and outcomes[0]["postcopy"]["native_faults"] is native
        if native:
            assert pc["faults"] > 0 and pc["requests"] > 0   # the guest ran on missing pages: faults were served
        assert report["settings"]["mode"] == ("postcopy" if mode.startswith("postcopy") else "hybrid")
        if mode.startswith("postcopy"):
            assert pc["switch_round"] == 1 and report["rounds"][0]["bytes_raw"] == 0
        if mode == "after-2":
            assert len(report["rounds"]) == 2 and report["rule"] == "postcopy-after"
        if mode.startswith("auto"):
            assert max(r["throttle"] for r in report["rounds"]) == 0.0   # never slowed: post-copy instead
        assert pc["stale_pages"] > 0
        assert pc["pushed_pages"] + pc["requested_pages"] == pc["stale_pages"]   # each page claimed once
        # a page a fault asked for after the push had sent it went again; the destination
        # installed each page exactly once (below), whichever copy came first
        sent_before = sum(r["dirty_pages"] - r["zero_pages"] for r in report["rounds"])
        assert report["pages_sent"] == sent_before + pc["stale_pages"] + pc["duplicate_pages"]
        assert 0 <= pc["duplicate_pages"] <= pc["faults"] * 16   # at most each fault's window
        assert report["bytes_wire"] >= report["pages_sent"] * 4096     # every page counted on the wire (uncompressed)
        assert report["downtime_ms"] is not None and "switch" in report["downtime_parts_ms"]
        dest = outcomes[0]
        assert dest["result"] == "resumed" and dest["error"] is None
        assert dest["postcopy"]["pushed_pages"] + dest["postcopy"]["requested_pages"] == pc["stale_pages"]
        assert pc["faults"] == dest["postcopy"]["faults"]
        deadline = time.monotonic() + 10
        while guest.alive() and time.monotonic() < deadline:
            await trio.sleep(0.05)
        assert not guest.alive()
        client = GuestClient(dest["guest_control"])
        try:
            assert _advances(client)
            assert client.check()["clean"]
            # onward: a plain pre-copy of the post-copied guest, which needs WP_ASYNC tracking back.
            # Its migrator runs in another process: this one is the guest's parent, whose reaper
            # would take the ptrace stops the freeze waits for.
            onward: list[dict] = []
            path = os.path.join(sockdir, "onward.json")
            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    address = await _receiver(nursery, onward, sockdir)
                    done = await trio.run_process(
                        [sys.executable, "-m", "migrator", "migrate", "--guest", dest["guest_control"], "--to", address,
                         "--insecure", "--quiet", "--report", path], capture_stdout=True, capture_stderr=True, check=False)
                    nursery.cancel_scope.cancel()
            assert done.returncode == 0, done.stderr.decode()
            with open(path) as f:
                again = json.load(f)
            assert again["verified"] and again["postcopy"] is None
        finally:
            client.close()
        final = GuestClient(onward[0]["guest_control"])
        try:
            assert _advances(final) and final.check()["clean"]
        finally:
            final.quit()


@pytest.mark.parametrize("mode", ["postcopy", "postcopy-native"])
async def test_a_link_cut_during_postcopy_is_recovered_and_the_guest_is_intact(sockdir, mode):
    """Cut after the commit: the source reconnects (--recover-timeout), the destination lists
    what it lacks, and the migration finishes verified with a guest that runs and checks clean.
    With the native fault loops, the resumed session answers the faults as frames."""
    settings, token = _settings(mode)
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=5000, fill="random") as guest:
        await trio.sleep(0.3)
        outcomes: list[dict] = []
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                address = await _receiver(nursery, outcomes, sockdir, token=token)
                proxy = FaultProxy("127.0.0.1", int(address.rsplit(":", 1)[1]), Faults(cut_at=32 * MiB))
                port = await nursery.start(proxy.serve)
                report = await _migrate(guest, f"127.0.0.1:{port}", compress="none", **settings)
                while not outcomes:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert proxy.statistics().cut
        assert report["result"] == "committed" and report["verified"]
        pc = report["postcopy"]
        assert pc["recoveries"] >= 1 and pc["resent_pages"] > 0
        assert pc["native_faults"] is (token is not None)
        dest = outcomes[-1]
        assert dest["result"] == "resumed" and dest["error"] is None
        client = GuestClient(dest["guest_control"])
        try:
            assert _advances(client) and client.check()["clean"]
        finally:
            client.quit()


async def test_a_link_cut_during_postcopy_keeps_the_source_frozen_and_the_destination_paused(sockdir):
    """Cut after the commit, and no reconnecting (--recover-timeout 0): the source never resumes
    (stopped, the failure says how many pages it still owed), the destination's guest waits on
    its next missing page instead of running on zeros."""
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=5000, fill="random") as guest:
        await trio.sleep(0.3)
        outcomes: list[dict] = []
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                address = await _receiver(nursery, outcomes, sockdir, recover_timeout_s=0)
                # post-copy from the start: nearly every byte of the stream is the post-copy push
                proxy = FaultProxy("127.0.0.1", int(address.rsplit(":", 1)[1]), Faults(cut_at=32 * MiB))
                port = await nursery.start(proxy.serve)
                with pytest.raises(MigrationFailed) as failure:
                    await _migrate(guest, f"127.0.0.1:{port}", compress="none", postcopy_after=0, recover_timeout_s=0)
                while not outcomes:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert failure.value.committed
        assert "post-copy interrupted" in str(failure.value) and "stays frozen" in str(failure.value)
        assert guest.alive() and _state(guest.pid) in ("T", "t")
        dest = outcomes[0]
        assert dest["result"] == "resumed" and dest["error"]
        client = GuestClient(dest["guest_control"])
        try:
            time.sleep(0.3)
            assert not _advances(client, 0.5), "the destination's guest ran on without its pages"
        finally:
            client.close()
            os.kill(dest["guest_pid"], signal.SIGKILL)


async def test_the_receiver_killed_during_postcopy_leaves_the_source_frozen(sockdir):
    receiver = subprocess.Popen(
        [sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0", "--once", "--control-dir", sockdir],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in receiver.stderr:
            if "listening on " in line:
                address = line.strip().rsplit(" ", 1)[-1]
                break
        with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=5000, fill="random") as guest:
            await trio.sleep(0.3)
            migration = SourceMigration(guest.control, address, MigrateSettings(
                compress="none", postcopy_after=0, bandwidth=16 * MiB, token=load_default_token(), recover_timeout_s=1))

            async def kill_once_committed():
                while not migration.committed:
                    await trio.sleep(0.01)
                await trio.sleep(0.5)
                receiver.send_signal(signal.SIGKILL)

            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kill_once_committed)
                    with pytest.raises(MigrationFailed) as failure:
                        await migration.run()
            assert failure.value.committed
            assert "post-copy interrupted" in str(failure.value)
            assert migration.report.postcopy is not None
            assert guest.alive() and _state(guest.pid) in ("T", "t")
            # the destination's guest outlives its receiver, waiting on its missing pages
            [restored] = _restore_guests(sockdir)
            client = GuestClient(os.path.join(sockdir, _control_of(restored)))
            try:
                assert not _advances(client, 0.5), "the destination's guest ran on without its pages"
            finally:
                client.close()
                os.kill(restored, signal.SIGKILL)
    finally:
        receiver.kill()
        receiver.wait()
        receiver.stderr.close()


def _restore_guests(directory: str) -> list[int]:
    """Restore guests whose control socket is in ``directory``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"--restore" in args and any(a.startswith(directory.encode() + b"/") for a in args):
            found.append(int(entry))
    return found


def _control_of(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().split(b"\0")
    return os.path.basename(args[args.index(b"--control") + 1].decode())


async def test_resuming_a_migration_nobody_waits_for_is_refused(sockdir):
    from migrator import protocol as p
    from migrator.transport import connect

    outcomes: list[dict] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await _receiver(nursery, outcomes, sockdir)
            channel = await connect(address, token=None, compress="none")
            async with channel:
                await channel.send(p.Resume(migration="no-such-migration"))
                await channel.flush()
                event = await channel.receive()
            while not outcomes:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert isinstance(event, p.Abort) and "no interrupted post-copy" in event.reason
    assert outcomes[0]["result"] == "discarded" and "no post-copy here waits" in outcomes[0]["error"]
