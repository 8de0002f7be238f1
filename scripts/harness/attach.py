"""The C target of the attach tests and benchmarks (``attach_target.c`` beside this file), built
with the machine's ``cc``; used by tests/tracker/test_attach.py and scripts/bench_attach.py.

Without a compiler, ``build`` skips the calling test (a benchmark reports the skip and exits)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SOURCE = Path(__file__).with_name("attach_target.c")
PAGE = os.sysconf("SC_PAGESIZE")


def build(directory: Path) -> Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build the attach target")
    binary = directory / "attach_target"
    subprocess.run([cc, "-O1", "-pthread", "-o", str(binary), str(SOURCE)], check=True, timeout=120)
    return binary


class Target:
    """A running attach_target: one command line in, one answer line out, each under a timeout."""

    def __init__(self, binary: Path, **popen) -> None:
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, **popen)
        self.pid = self.proc.pid

    def ask(self, command: str, timeout: float = 10) -> str:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the target did not answer {command!r} within {timeout} s"
        line = self.proc.stdout.readline().decode().strip()
        assert line.startswith("ok"), f"{command!r}: {line!r}"
        return line[3:]

    def map(self, pages: int, kind: str = "map") -> int:
        return int(self.ask(f"{kind} {pages}"), 16)

    def write(self, address: int, first: int, count: int, *, thread: bool = False) -> None:
        self.ask(f"{'twrite' if thread else 'write'} {address:x} {first} {count}")

    def count(self) -> int:
        return int(self.ask("count"))

    def vmflags(self, address: int) -> set[str]:
        """The VmFlags of the mapping holding ``address``."""
        current = None
        with open(f"/proc/{self.pid}/smaps") as smaps:
            for line in smaps:
                head = line.split(" ", 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    current = lo <= address < hi
                elif head == "VmFlags:" and current:
                    return set(line.split()[1:])
        raise AssertionError(f"{address:#x} is not mapped in {self.pid}")

    def fds(self) -> list[str]:
        return [os.readlink(f"/proc/{self.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{self.pid}/fd")]

    def tracer(self) -> str:
        with open(f"/proc/{self.pid}/status") as status:
            return next(line.split()[1] for line in status if line.startswith("TracerPid:"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdin.close()
        self.proc.stdout.close()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def migrator_cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "migrator", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def pages_in(runs, start: int, pages: int) -> set[int]:
    """Page offsets inside [start, start + pages) that ``runs`` cover."""
    found = set()
    for address, count in runs:
        for page in range(count):
            offset = (address - start) // PAGE + page
            if 0 <= offset < pages:
                found.add(offset)
    return found
