"""``migrate --resume``: an operator finishes a post-copy whose source went away after the commit.

Real guests, a real receiver on loopback TCP and the real command line; the interruption is a
cut link (the fault proxy, automatic recovery off) or a SIGKILLed ``migrate``. Every wait is
under ``trio.fail_after`` or a subprocess timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time

import pytest
import trio

from harness.faultproxy import FaultProxy, Faults
from harness.loopback import Receiver, thread_states
from migrator.core.errors import MigrationFailed, ResumeRefused
from migrator.destination.engine import DestinationMigration, ReceiveSettings
from migrator.guest import committed
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.source.resume import find_interrupted
from migrator.transport import serve

MiB = 1 << 20
SIZE = 64 * MiB
MIGRATOR = [sys.executable, "-m", "migrator"]
LOG: list[str] = []     # the receivers' lines, for a failure's message


async def _receiver(nursery, outcomes: list[dict], sockdir: str, recover_timeout_s: float = 120) -> str:
    """A receiver in this process whose interrupted post-copies wait ``recover_timeout_s``."""
    async def handle(channel):
        migration = DestinationMigration(
            channel, ReceiveSettings(control_dir=sockdir, recover_timeout_s=recover_timeout_s), log=LOG.append)
        try:
            outcomes.append((await migration.run()).to_dict())
        except MigrationFailed:
            outcomes.append(migration.report.to_dict())

    return await nursery.start(functools.partial(serve, "127.0.0.1:0", handle, token=None))


def _source_guest(sockdir: str):
    return spawn_guest(os.path.join(sockdir, "src.sock"), size=SIZE, dirty_rate=5000, fill="random")


async def _wait(condition, what: str, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


async def _cut_postcopy(guest, address: str) -> SourceMigration:
    """A post-copy whose link is cut after the commit, with automatic recovery off: the source
    guest stays frozen and the receiver waits for a session resuming it."""
    proxy = FaultProxy("127.0.0.1", int(address.rsplit(":", 1)[1]), Faults(cut_at=32 * MiB))
    migration = SourceMigration(guest.control, "", MigrateSettings(compress="none", postcopy_after=0,
                                                                   recover_timeout_s=0))
    async with trio.open_nursery() as nursery:
        migration.address = f"127.0.0.1:{await nursery.start(proxy.serve)}"
        with pytest.raises(MigrationFailed) as failure:
            await migration.run()
        nursery.cancel_scope.cancel()
    assert proxy.statistics().cut and failure.value.committed
    line = str(failure.value)
    # the failure names the migration and the exact command that finishes it
    assert f"migrator migrate --resume {migration.id} --guest {guest.control} --to {migration.address} --insecure" in line
    await _wait(lambda: thread_states(guest.pid) == {"T"}, "the committed source's group-stop")
    return migration


async def _resume(*args: str, timeout: float = 90) -> trio.Process:
    with trio.fail_after(timeout):
        return await trio.run_process([*MIGRATOR, "migrate", "--insecure", *args], capture_stdout=True,
                                      capture_stderr=True, check=False)


def _advances(control: str, seconds: float = 0.3) -> bool:
    with GuestClient(control) as client:
        before = client.stats()["steps"]
        time.sleep(seconds)
        return client.stats()["steps"] > before


async def _assert_finished(done: trio.Process, guest, outcomes: list[dict], report_path: str, migration: str) -> None:
    """The resumed session verified every page: the destination guest runs and checks clean, the
    source guest is gone and so is its state file; the report says what the resume did."""
    if done.returncode != 0:
        pytest.fail("\n".join([done.stderr.decode(), *LOG, *(str(o.get("error")) for o in outcomes)]))
    await _wait(lambda: outcomes and outcomes[-1]["result"] == "resumed", "the destination's verdict")
    dest = outcomes[-1]
    assert dest["error"] is None and dest["id"] == migration, dest
    with open(report_path) as f:
        report = json.load(f)
    assert report["settings"]["mode"] == "resume" and report["id"] == migration
    assert report["result"] == "committed" and report["verified"] and report["error"] is None
    pc = report["postcopy"]
    assert pc["recoveries"] == 1 and pc["resent_pages"] == pc["stale_pages"] > 0
    assert report["pages_sent"] >= pc["stale_pages"]
    assert "resume" in done.stdout.decode()       # the summary
    await _wait(lambda: not guest.alive(), "the source guest's end")
    assert not os.path.exists(committed.state_path(guest.control))
    assert _advances(dest["guest_control"])
    with GuestClient(dest["guest_control"]) as client:
        assert client.check()["clean"]
        client.quit()


async def test_resume_finishes_a_postcopy_whose_link_was_cut(sockdir):
    """(a) The link cut after the commit with --recover-timeout 0 at the source; an operator's
    ``migrate --resume`` finishes it."""
    with _source_guest(sockdir) as guest:
        await trio.sleep(0.3)
        outcomes: list[dict] = []
        report = os.path.join(sockdir, "resume.json")
        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                address = await _receiver(nursery, outcomes, sockdir)
                migration = await _cut_postcopy(guest, address)
                interrupted = find_interrupted(guest.control)
                assert interrupted.migration == migration.id and interrupted.pid == guest.pid
                assert interrupted.layout.total_bytes == SIZE and interrupted.destination == migration.address
                # the operator finds the id and the command from the guest alone
                with trio.fail_after(30):
                    status = await trio.run_process([*MIGRATOR, "status", "--guest", guest.control],
                                                    capture_stdout=True, check=True)
                assert f"migrate --resume {migration.id} --guest {guest.control}" in status.stdout.decode()
                done = await _resume("--resume", migration.id, "--guest", guest.control, "--to", address,
                                     "--report", report)
                await _assert_finished(done, guest, outcomes, report, migration.id)
                nursery.cancel_scope.cancel()


async def test_resume_finishes_a_postcopy_whose_migrator_was_killed(sockdir):
    """(b) ``migrate`` SIGKILLed during post-copy: the guest's stop outlives it, the receiver
    waits, and ``migrate --resume`` with the id from the state file finishes it."""
    with _source_guest(sockdir) as guest:
        await trio.sleep(0.3)
        outcomes: list[dict] = []
        report = os.path.join(sockdir, "resume.json")
        state = committed.state_path(guest.control)
        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                address = await _receiver(nursery, outcomes, sockdir)
                source = await trio.lowlevel.open_process(
                    [*MIGRATOR, "migrate", "--guest", guest.control, "--to", address, "--insecure", "--postcopy",
                     "--bandwidth", "8M", "--compress", "none", "--quiet"],
                    stdin=None, stdout=None, stderr=None)
                try:
                    await _wait(lambda: os.path.exists(state), "the commit", timeout=60)
                    await trio.sleep(0.5)          # the push is under way
                    assert source.poll() is None, "post-copy ended before the kill"
                    source.send_signal(signal.SIGKILL)
                    with trio.fail_after(10):
                        await source.wait()
                finally:
                    source.kill()
                await _wait(lambda: thread_states(guest.pid) == {"T"}, "the committed source's group-stop")
                migration = committed.read_record(guest.control).migration
                done = await _resume("--resume", migration, "--guest", guest.control, "--to", address,
                                     "--report", report)
                await _assert_finished(done, guest, outcomes, report, migration)
                nursery.cancel_scope.cancel()


def _restore_guest_controls(directory: str) -> list[str]:
    """The control sockets of the restore guests whose sockets are in ``directory``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = [a.decode() for a in f.read().split(b"\0")]
        except OSError:
            continue
        if "--restore" in args and args[args.index("--control") + 1].startswith(directory + "/"):
            found.append(args[args.index("--control") + 1])
    return found


def _one_line(done: trio.Process) -> str:
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


async def test_bad_resumes_fail_in_one_line_and_leave_the_guest_frozen(sockdir):
    """(c) A wrong id, a guest no post-copy froze, a receiver with no such migration waiting and
    a Layout that differs: each fails in one line with a non-zero status, the source guest stays
    frozen with its state file, the destination's guest stays paused; and the receiver still
    waits, so a right ``--resume`` afterwards finishes the migration."""
    with _source_guest(sockdir) as guest:
        await trio.sleep(0.3)
        outcomes: list[dict] = []
        report = os.path.join(sockdir, "resume.json")
        state = committed.state_path(guest.control)
        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                address = await _receiver(nursery, outcomes, sockdir)
                migration = (await _cut_postcopy(guest, address)).id
                with open(state, "rb") as f:
                    recorded = f.read()
                [paused] = _restore_guest_controls(sockdir)

                async def still_frozen() -> None:
                    assert guest.alive() and thread_states(guest.pid) == {"T"}
                    with open(state, "rb") as f:
                        assert f.read() == recorded
                    assert not _advances(paused, 0.2), "the destination's guest ran on without its pages"

                # a wrong id: refused before anything is sent (exit 2)
                done = await _resume("--resume", "0" * 32, "--guest", guest.control, "--to", address, "--quiet")
                assert done.returncode == 2
                assert f"was committed by migration {migration}, not {'0' * 32}" in _one_line(done)
                await still_frozen()

                # a guest that no post-copy froze (a running one, no state file)
                with spawn_guest(os.path.join(sockdir, "other.sock"), size=4 * MiB, dirty_rate=1000) as other:
                    done = await _resume("--resume", migration, "--guest", other.control, "--to", address, "--quiet")
                    assert done.returncode == 2 and "no migration committed the guest" in _one_line(done)
                    with pytest.raises(ResumeRefused):
                        find_interrupted(other.control)
                    assert _advances(other.control), "the running guest was left as it was"
                    other.stop()
                await still_frozen()

                # a receiver where no such migration waits (exit 3: the source stays frozen); in
                # another process, as a receiver's waiting migrations are its process's
                elsewhere = Receiver(os.path.join(sockdir, "elsewhere"), "--insecure")
                try:
                    done = await _resume("--resume", migration, "--guest", guest.control, "--to", elsewhere.address,
                                         "--quiet")
                finally:
                    elsewhere.kill()
                assert done.returncode == 3
                line = _one_line(done)
                assert "no interrupted post-copy" in line and "stays frozen" in line, line
                await still_frozen()

                # a Layout that differs from the interrupted migration's (the state file edited)
                doc = json.loads(recorded)
                doc["regions"][0][1] //= 2
                with open(state, "w") as f:
                    json.dump(doc, f)
                done = await _resume("--resume", migration, "--guest", guest.control, "--to", address, "--quiet")
                with open(state, "wb") as f:
                    f.write(recorded)
                assert done.returncode == 3
                line = _one_line(done)
                assert "refused to resume" in line and "Layout differs" in line and "stays frozen" in line, line
                await still_frozen()
                assert [o["error"] for o in outcomes if o["id"] == migration] == [], "the interrupted migration gave up"
                assert all("Layout differs" in o["error"] for o in outcomes), outcomes   # the refused session's

                # and the receiver still waits: the right command finishes it
                done = await _resume("--resume", migration, "--guest", guest.control, "--to", address,
                                     "--report", report)
                await _assert_finished(done, guest, outcomes, report, migration)
                nursery.cancel_scope.cancel()
