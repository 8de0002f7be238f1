"""Migrations over loopback with the real CLIs, watched from outside (no namespaces, no root).

Shared by ``tests/test_migrate_kills.py`` and ``scripts/fault_kills.py``: a CLI child whose
stderr lines are collected as they come, and what /proc says about a guest's threads (``t`` =
stopped by its tracer, ``T`` = stopped by a signal). Every wait has a bound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

MIGRATOR = (sys.executable, "-m", "migrator")


class Cli:
    """A ``migrator`` child; ``lines`` fills with its stderr as it comes."""

    def __init__(self, *args: str) -> None:
        self.started = time.monotonic()
        self.popen = subprocess.Popen([*MIGRATOR, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.times: list[float] = []         # when each line came (time.monotonic)
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.popen.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self.times.append(time.monotonic())
                self._changed.notify_all()

    def wait_line(self, needle, timeout: float = 30.0) -> str:
        """The first line containing ``needle`` (or for which ``needle(line)`` is true);
        AssertionError when none comes within ``timeout`` or the child exits first."""
        matches = needle if callable(needle) else (lambda line: needle in line)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if matches(line):
                        return line
                left = deadline - time.monotonic()
                assert left > 0 and self.popen.poll() is None, f"no line with {needle!r}: {self.lines}"
                self._changed.wait(min(left, 0.1))

    def line_time(self, needle: str) -> float | None:
        """When the first line containing ``needle`` came, or None."""
        with self._changed:
            for line, at in zip(self.lines, self.times):
                if needle in line:
                    return at
        return None

    def sigkill(self) -> bool:
        """SIGKILL it; True when that is what ended it (False: it had exited by itself)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        return self.popen.wait(10) == -signal.SIGKILL

    def wait(self, timeout: float = 60.0) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


class Receiver(Cli):
    """``migrator receive --once`` on 127.0.0.1 (any port); returns once it listens."""

    def __init__(self, workdir: str, *extra: str) -> None:
        self.control_dir = os.path.join(workdir, "dest")
        self.report = os.path.join(workdir, "dest.json")
        os.makedirs(self.control_dir, exist_ok=True)
        super().__init__("receive", "--listen", "127.0.0.1:0", "--once", "--control-dir", self.control_dir,
                         "--report", self.report, *extra)
        self.address = self.wait_line("listening on ").rsplit(" ", 1)[-1]


def thread_states(pid: int) -> set[str]:
    """The /proc state letters of ``pid``'s threads (empty when it is gone)."""
    states = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return states
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        states.add(chr(data[data.rindex(b")") + 2]))
    return states


def stopped_for(pid: int, seconds: float, letter: str = "t") -> bool:
    """Every thread in state ``letter``, and still so ``seconds`` later (sampled throughout)."""
    deadline = time.monotonic() + seconds
    while thread_states(pid) == {letter}:
        if time.monotonic() > deadline:
            return True
        time.sleep(0.002)
    return False


def wait_until(condition, what: str, timeout: float, interval: float = 0.0005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
