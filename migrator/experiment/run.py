"""Run an experiment: every cell a real migration of a real guest over loopback TCP.

The receiver is a separate ``migrator receive`` process, started once per experiment, so the
source's CPU seconds (``getrusage`` of this process) are the migrator's alone and the receiver's
are read from its ``/proc/PID/stat``. For each cell: spawn a guest writing at the cell's rate,
let it settle, migrate it with the in-process source engine, quit the resumed destination guest.
Cells run one after another (the machine has two vCPUs; concurrent cells would measure each
other). A failed cell is recorded with its error and the run goes on.

Needs what ``migrator migrate`` needs: userfaultfd (WP_ASYNC for wp-async, Linux 6.7+) and
ptrace-read rights over the guests, which this process has as their parent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from ..core.errors import GuestError, MigratorError
from ..core.files import open_log
from ..core.tokens import load_default_token
from ..guest.client import GuestClient
from ..guest.spawn import spawn_guest
from ..source.migration import MigrateSettings, SourceMigration
from .compare import Window, measure_slowdown, process_cpu_s
from .grid import Cell, Grid
from .results import CellResult

RECEIVER_START_TIMEOUT_S = 30.0
CELL_TIMEOUT_S = 180.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Receiver:
    """A ``migrator receive`` child on a loopback port; restore guests' sockets in ``control_dir``.
    It authenticates sources with this user's default token (``migrator.core.tokens``), made
    by the child if there was none: ``token`` is read once it listens."""

    def __init__(self, control_dir: str, log_path: str | Path) -> None:
        self.control_dir = control_dir
        os.makedirs(control_dir, exist_ok=True)
        self._log = open_log(log_path)
        argv = [sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0", "--control-dir", control_dir]
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        self.address = self._wait_listening(log_path)
        try:
            self.token = load_default_token()
        except MigratorError:
            self.close()
            raise

    def _wait_listening(self, log_path: str | Path) -> str:
        deadline = time.monotonic() + RECEIVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = Path(log_path).read_text(errors="replace")
            for line in text.splitlines():
                if "listening on " in line:
                    return line.rsplit(" ", 1)[-1]
            if self.popen.poll() is not None:
                self.close()
                raise MigratorError(f"the receiver exited with status {self.popen.returncode}: "
                                    f"{text.strip().splitlines()[-1] if text.strip() else 'no output'}")
            time.sleep(0.05)
        self.close()
        raise MigratorError(f"the receiver did not listen within {RECEIVER_START_TIMEOUT_S:g} s")

    def cpu_s(self) -> float | None:
        """The receiver's CPU seconds so far (None if it is gone)."""
        try:
            with open(f"/proc/{self.popen.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK   # utime, stime (fields 14, 15)

    def quit_guests(self) -> list[int]:
        """Quit every restore guest the receiver started; the step counts they had reached (a
        guest that does not answer has its socket removed and is left to the receiver)."""
        steps = []
        for name in sorted(os.listdir(self.control_dir)):
            if name.endswith(".sock"):
                path = os.path.join(self.control_dir, name)
                try:
                    with GuestClient(path, timeout=5.0) as client:
                        steps.append(client.stats()["steps"])
                        client.quit()
                except GuestError:
                    _unlink(path)
        return steps

    def close(self) -> None:
        self.quit_guests()
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def migrate_settings(cell: Cell, grid: Grid, token: bytes | None) -> MigrateSettings:
    """A cell's migration: it switches over as soon as the target is met (``switch_asap``), the
    stop rule of the classic model it is compared with."""
    return MigrateSettings(
        downtime_ms=grid.downtime_ms, max_rounds=grid.max_rounds, bandwidth=cell.bandwidth,
        compress=grid.compress, tracker=cell.tracker, verify="pages", force_switchover=not cell.auto_converge,
        switch_asap=True, token=token,
    )


async def run_cell(cell: Cell, repeat: int, grid: Grid, receiver: Receiver, sockdir: str) -> CellResult:
    """Spawn the cell's guest and migrate it; a failed cell is a result (with its error), not an
    exception."""
    control = os.path.join(sockdir, "source.sock")
    try:
        guest = await trio.to_thread.run_sync(
            lambda: spawn_guest(control, size=cell.size, dirty_rate=cell.dirty_rate, pattern=cell.pattern,
                                fill=grid.fill, seed=1 + repeat, replay=cell.trace, extra_args=["--exit-with-parent"])
        )
    except GuestError as exc:
        return CellResult(cell, repeat, _failed_report(exc), 0.0, 0.0, None, None)
    try:
        await trio.sleep(grid.settle_s)
        before = await trio.to_thread.run_sync(_stats, control)
        migration = SourceMigration(control, receiver.address, migrate_settings(cell, grid, receiver.token))
        cpu, dest_cpu = process_cpu_s(), receiver.cpu_s()
        try:
            with trio.fail_after(CELL_TIMEOUT_S):
                report = (await migration.run()).to_dict()
        except (MigratorError, trio.TooSlowError) as exc:
            report = migration.report.to_dict() if migration.report is not None else _failed_report(exc)
        cpu = process_cpu_s() - cpu
        dest_after = receiver.cpu_s()
        dest_cpu = None if dest_cpu is None or dest_after is None else dest_after - dest_cpu
    finally:
        await trio.to_thread.run_sync(guest.stop)
        resumed = await trio.to_thread.run_sync(receiver.quit_guests)
    return CellResult(cell, repeat, report, before.get("write_rate", 0.0), cpu, dest_cpu,
                      _rate_during(before.get("steps"), resumed, report),
                      (before.get("replay") or {}).get("at_s"))


def _rate_during(steps_before: int | None, resumed: list[int], report: dict) -> float | None:
    """Page writes/s the guest achieved from the start of the migration to its freeze.

    The step counter lives in the region, so the resumed destination guest's count (read right
    after the migration: a few milliseconds of its own steps too) is the count at the freeze.
    """
    if steps_before is None or len(resumed) != 1 or report.get("downtime_ms") is None:
        return None
    seconds = report["total_s"] - report["downtime_ms"] / 1e3
    return (resumed[0] - steps_before) / seconds if seconds > 0 else None


def _stats(control: str) -> dict:
    """The guest's stats, or {} if it does not answer (the migration will then say why)."""
    try:
        with GuestClient(control) as client:
            return client.stats()
    except GuestError:
        return {}


def _failed_report(exc: BaseException) -> dict:
    error = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
    return {"rounds": [], "result": "failed", "error": error, "verified": False}


async def run_slowdown(grid: Grid, sockdir: str, log: Callable[[str], None]) -> list[Window]:
    """The tracker comparison's guest-slowdown windows on one guest writing without limit."""
    settings = grid.compare
    control = os.path.join(sockdir, "compare.sock")
    guest = await trio.to_thread.run_sync(
        lambda: spawn_guest(control, size=settings.size, dirty_rate=None, pattern=settings.pattern,
                            fill=grid.fill, extra_args=["--exit-with-parent"])
    )
    try:
        await trio.sleep(grid.settle_s)
        return await trio.to_thread.run_sync(lambda: measure_slowdown(control, settings, log))
    finally:
        await trio.to_thread.run_sync(guest.stop)


async def run_experiment(
    grid: Grid, out_dir: str | Path, *, log: Callable[[str], None] = print,
    on_result: Callable[[CellResult], None] = lambda result: None,
) -> tuple[list[CellResult], list[Window]]:
    """Run every cell of ``grid`` (then the slowdown windows); the receiver's log goes to out_dir."""
    runs = grid.runs()
    results: list[CellResult] = []
    with tempfile.TemporaryDirectory(prefix="mig-exp-", dir="/tmp") as sockdir:
        receiver = await trio.to_thread.run_sync(
            Receiver, os.path.join(sockdir, "dest"), Path(out_dir) / "receiver.log"
        )
        try:
            for i, (repeat, cell) in enumerate(runs, 1):
                result = await run_cell(cell, repeat, grid, receiver, sockdir)
                results.append(result)
                on_result(result)
                log(f"[{i}/{len(runs)}] {cell.name}: {_outcome(result.report)}")
        finally:
            await trio.to_thread.run_sync(receiver.close)
        windows: list[Window] = []
        if grid.compare.enabled:
            log(f"tracker comparison: {grid.compare.size >> 20} MiB {grid.compare.pattern} guest at unlimited "
                f"rate, {grid.compare.window_s:g} s windows, collect every {grid.compare.interval_s * 1e3:g} ms")
            windows = await run_slowdown(grid, sockdir, log)
    return results, windows


def _outcome(report: dict) -> str:
    if report.get("result") != "committed":
        return f"FAILED: {report.get('error')}"
    return (f"{len(report['rounds'])} rounds, rule {report['rule']}, downtime {report['downtime_ms']:.1f} ms, "
            f"{report['bytes_wire'] / (1 << 20):.1f} MiB sent in {report['total_s']:.2f} s")
