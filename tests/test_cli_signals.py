"""SIGTERM and SIGHUP end a command as Ctrl-C does (``migrator.cli.interrupts``), and commands
leave nothing behind: real ``migrator`` processes, real guests, loopback TCP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from migrator.cli import interrupts
from migrator.core.errors import MigrationFailed
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.tracker.features import wp_async_missing
from harness.hosts import LineLog

MiB = 1 << 20
needs_wp_async = pytest.mark.skipif(wp_async_missing() is not None,
                                    reason=f"needs userfaultfd WP_ASYNC: {wp_async_missing()}")


# --- the mechanism, in this process --------------------------------------------------------------


def test_sigterm_cancels_the_work_lets_its_cleanup_run_and_names_the_signal():
    cleaned: list[str] = []
    handler = signal.getsignal(signal.SIGTERM)

    async def work():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await trio.sleep(10)
            cleaned.append("not cancelled")
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0)              # cleanup may still await, as the engines' does
                cleaned.append("cleaned up")

    with pytest.raises(interrupts.Interrupted) as interrupted:
        interrupts.run(work)
    assert cleaned == ["cleaned up"]
    assert (interrupted.value.signum, interrupted.value.exit_status) == (signal.SIGTERM, 143)
    assert str(interrupted.value) == "interrupted by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is handler, "the handler is put back"


def test_a_migration_failed_by_the_signal_says_on_which_side_of_the_point_of_no_return():
    async def work():
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            await trio.sleep(10)
        except trio.Cancelled as exc:
            raise MigrationFailed("cancelled", committed=False) from exc

    with pytest.raises(interrupts.Interrupted) as interrupted:
        interrupts.run(work)
    assert interrupted.value.exit_status == 129
    assert str(interrupted.value) == "interrupted by SIGHUP before the point of no return"


def test_work_that_ends_without_a_signal_returns_its_value_and_errors_unwrapped():
    async def fails():
        raise MigrationFailed("plain failure")

    assert interrupts.run(trio.sleep, 0) is None
    with pytest.raises(MigrationFailed, match="plain failure"):
        interrupts.run(fails)


# --- real commands -------------------------------------------------------------------------------


class Command:
    """A ``migrator`` child with its stderr read line by line (``LineLog``)."""

    def __init__(self, process: trio.Process, log: LineLog) -> None:
        self.process, self.log = process, log

    async def wait(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            status = await self.process.wait()
        await self.log.wait_closed(timeout)
        return status

    def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def start(nursery: trio.Nursery, name: str, *args: str, env: dict | None = None) -> Command:
    process = await trio.lowlevel.open_process([sys.executable, "-m", "migrator", *args], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    log = LineLog(name)
    nursery.start_soon(log.pump, process.stderr)
    return Command(process, log)


async def listening(receiver: Command) -> str:
    return (await receiver.log.wait_for("listening on", timeout=30)).rsplit(" ", 1)[-1]


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T for stopped, Z for a zombie), None once reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


async def wait_reaped(pid: int, timeout: float = 15) -> None:
    """Until /proc/PID is gone: a zombie (Z) nobody reaps keeps it, and fails this."""
    with trio.move_on_after(timeout):
        while proc_state(pid) is not None:
            await trio.sleep(0.05)
    assert proc_state(pid) is None, f"pid {pid} is still there in state {proc_state(pid)}"


def restore_sockets(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("restore-"))


def _assert_running(client: GuestClient) -> None:
    before = client.stats()["steps"]
    time.sleep(0.3)
    assert client.stats()["steps"] > before, "the guest does not run"


@needs_wp_async
async def test_sigterm_of_migrate_in_round_0_resumes_the_source_and_the_destination_discards(sockdir, tmp_path):
    report = tmp_path / "run.json"
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            receiver = await start(nursery, "receive", "receive", "--listen", "127.0.0.1:0", "--control-dir", sockdir)
            try:
                address = await listening(receiver)
                with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=2000) as guest:
                    source = await start(nursery, "migrate", "migrate", "--guest", guest.control, "--to", address,
                                         "--bandwidth", "4M", "--report", str(report))   # round 0 takes ~17 s
                    line = await receiver.log.wait_for("into restore guest pid", timeout=30)
                    restore_pid = int(line.rsplit(" ", 1)[-1])
                    await trio.sleep(0.5)
                    source.process.send_signal(signal.SIGTERM)
                    assert await source.wait(30) == 143, source.log.lines
                    rest = [line for line in source.log.lines if not line.startswith("migrator: control socket ")]
                    assert rest == ["migrator: interrupted by SIGTERM before the point of no return"]
                    for _ in range(5):
                        assert proc_state(guest.pid) not in ("T", "t"), "the source guest was left stopped"
                        await trio.sleep(0.1)
                    with guest.client() as client:
                        _assert_running(client)
                        assert client.check()["clean"]
                    await receiver.log.wait_for("migration failed: source aborted", timeout=15)
                    await wait_reaped(restore_pid)
                    assert restore_sockets(sockdir) == [], "the discarded restore guest's socket is left"
                    written = json.loads(report.read_text())
                    assert written["result"] == "failed" and written["committed"] is False
                assert receiver.process.returncode is None, "the receiver keeps serving"
                receiver.process.send_signal(signal.SIGTERM)
                assert await receiver.wait(30) == 143
                assert receiver.log.lines[-1] == "migrator: interrupted by SIGTERM"
            finally:
                receiver.stop()


@needs_wp_async
async def test_sigterm_of_receive_mid_migration_discards_its_copy_and_the_source_resumes(sockdir):
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            receiver = await start(nursery, "receive", "receive", "--listen", "127.0.0.1:0", "--control-dir", sockdir, "--insecure")
            try:
                address = await listening(receiver)
                with spawn_guest(os.path.join(sockdir, "src.sock"), size=64 * MiB, dirty_rate=2000) as guest:

                    async def terminate_receiver_in_round_0():
                        line = await receiver.log.wait_for("into restore guest pid", timeout=30)
                        await trio.sleep(0.5)
                        receiver.process.send_signal(signal.SIGTERM)
                        assert await receiver.wait(30) == 143
                        await wait_reaped(int(line.rsplit(" ", 1)[-1]))

                    nursery.start_soon(terminate_receiver_in_round_0)
                    with pytest.raises(MigrationFailed) as failure:
                        await SourceMigration(guest.control, address, MigrateSettings(bandwidth=4 * MiB)).run()
                    assert not failure.value.committed
                    with guest.client() as client:
                        _assert_running(client)
            except BaseException:
                receiver.stop()          # only on failure: the task above waits for its own exit
                raise
    assert receiver.log.lines[-1] == "migrator: interrupted by SIGTERM"      # after the task saw it reaped
    assert restore_sockets(sockdir) == []


@needs_wp_async
async def test_a_resumed_guest_that_exits_is_reaped_by_a_receiver_that_keeps_running(sockdir):
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            receiver = await start(nursery, "receive", "receive", "--listen", "127.0.0.1:0", "--control-dir", sockdir, "--insecure")
            try:
                address = await listening(receiver)
                with spawn_guest(os.path.join(sockdir, "src.sock"), size=16 * MiB, dirty_rate=1000) as guest:
                    report = (await SourceMigration(guest.control, address, MigrateSettings()).run()).to_dict()
                assert report["result"] == "committed"
                line = await receiver.log.wait_for("resumed guest pid", timeout=15)
                pid, control = int(line.split("pid ")[1].split(",")[0]), line.rsplit(" ", 1)[-1]
                with GuestClient(control) as client:
                    _assert_running(client)
                    client.quit()
                await wait_reaped(pid)
                assert receiver.process.returncode is None
                assert restore_sockets(sockdir) == []
            finally:
                receiver.stop()


@needs_wp_async
async def test_receive_once_removes_its_own_control_dir_after_a_failed_migration(sockdir):
    tmpdir = os.path.join(sockdir, "t")       # receive's temporary control dir is made here
    os.mkdir(tmpdir)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            receiver = await start(nursery, "receive", "receive", "--listen", "127.0.0.1:0", "--once", "--insecure",
                                   env=dict(os.environ, TMPDIR=tmpdir))
            try:
                address = await listening(receiver)
                with spawn_guest(os.path.join(sockdir, "src.sock"), size=32 * MiB, dirty_rate=1000) as guest:
                    settings = MigrateSettings(bandwidth=1 * MiB, round_timeout_s=1.0)    # round 0 cannot finish
                    with pytest.raises(MigrationFailed, match="took more than 1 s"):
                        await SourceMigration(guest.control, address, settings).run()
                assert await receiver.wait(30) == 1
                assert any("migration failed" in line for line in receiver.log.lines)
                assert os.listdir(tmpdir) == [], "receive left its control directory (or a socket in it)"
            finally:
                receiver.stop()


async def test_sighup_ends_receive_with_129_and_removes_its_control_dir(sockdir):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            receiver = await start(nursery, "receive", "receive", "--listen", "127.0.0.1:0",
                                   env=dict(os.environ, TMPDIR=sockdir))
            try:
                await listening(receiver)
                assert len(os.listdir(sockdir)) == 1          # its control dir
                receiver.process.send_signal(signal.SIGHUP)
                assert await receiver.wait(30) == 129
                assert receiver.log.lines[-1] == "migrator: interrupted by SIGHUP"
                assert os.listdir(sockdir) == []
            finally:
                receiver.stop()


@needs_wp_async
async def test_sigterm_of_a_continuous_checkpoint_keeps_the_guest_and_the_reports_so_far(sockdir, tmp_path):
    chain, report = tmp_path / "chain", tmp_path / "reports.json"
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 * MiB, dirty_rate=1000) as guest:
                checkpoint = await start(nursery, "checkpoint", "checkpoint", "--guest", guest.control, "--dir",
                                         str(chain), "--every", "0.2", "--report", str(report))
                try:
                    with trio.fail_after(60):
                        while not report.exists():
                            await trio.sleep(0.05)
                    checkpoint.process.send_signal(signal.SIGTERM)
                    assert await checkpoint.wait(30) == 143
                    assert checkpoint.log.lines[-1].startswith("migrator: interrupted by SIGTERM")
                finally:
                    checkpoint.stop()
                assert proc_state(guest.pid) not in (None, "T", "t", "Z")
                with guest.client() as client:
                    _assert_running(client)
                reports = json.loads(report.read_text())
                assert reports and all(r["result"] == "written" for r in reports)
                assert not [n for n in os.listdir(chain) if ".partial-" in n], "an unfinished image is left"
