"""A scratch process to track: maps memory, hands over its uffd, writes pages when told.

Used by ``migrator track`` (the demo), the tracker tests and ``scripts/bench_tracker.py``, so all
of them track a real separate process (which must create its own uffd: that is how userfaultfd
works) and can put any blocking write under a timeout. It is not the migration workload (see
``migrator.guest``); it only writes what it is told, or random pages at a paced rate.

The child runs ``python -m migrator.tracker.scratch`` with one end of a socketpair. It sends one
JSON line ``{"ok": true, "pid", "start", "length", "page_size", "uffd_fd"}`` with its uffd attached
(SCM_RIGHTS), then answers one JSON line per request line:

- ``{"op": "write", "runs": [[first_page, pages], ...]}``: writes one byte in each page (C-speed
  strided slice per run); answers ``{"ok": true, "seconds": <time spent writing>}``
- ``{"op": "read", "runs": ...}``: reads one byte of each page (maps never-touched pages to the
  shared zero page)
- ``{"op": "start-writing", "rate": pages_per_s, "seed": n}`` / ``{"op": "stop-writing"}``: random
  single-page writes paced by the wall clock in a thread; stop answers ``{"pages": written}``, and
  ``{"op": "written"}`` tells the count so far
- ``{"op": "quit"}``

Page indices are bounds-checked; a bad request gets ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence

from ..core.errors import GuestError
from ..core.model import Region
from . import _sys
from .handover import recv_fds, register_for_tracking, send_fds

MODES = ("async", "sync", "none")
PACE_TICK_S = 0.002
MAX_DEBT_S = 0.1  # after a stall (SIGSTOP, a blocked write) catch up at most this much
MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)  # <linux/mman.h>; Python 3.11 lacks the name


class ScratchTimeout(GuestError):
    """The scratch process did not answer in time (e.g. blocked on a write-protected page)."""


# --- the parent's side ------------------------------------------------------------------------------


def page_runs(pages: Iterable[int]) -> list[list[int]]:
    """Page indices -> sorted [first, count] runs."""
    runs: list[list[int]] = []
    for page in sorted(set(pages)):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1][1] += 1
        else:
            runs.append([page, 1])
    return runs


class ScratchProcess:
    """Spawn a scratch process; ``.region``, ``.pid`` and ``take_uffd()`` feed ``open_tracker``."""

    def __init__(self, size: int, mode: str = "async", *, populate: bool = False, keep_uffd: bool = False,
                 timeout: float = 10.0, hugetlb: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.timeout = timeout
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [sys.executable, "-m", "migrator.tracker.scratch", "--size", str(size), "--mode", mode,
                "--socket-fd", str(child.fileno())]
        args += ["--populate"] * populate + ["--keep-uffd"] * keep_uffd + ["--hugetlb"] * hugetlb
        self._process = subprocess.Popen(args, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
        child.close()
        self._sock = parent
        self._sock.settimeout(timeout)
        self._buffer = b""
        self._uffd: int | None = None
        try:
            data, fds = recv_fds(self._sock, 4096, 1)
            self._buffer = data
            hello = self._reply("start-up")
        except BaseException:
            self.close()
            raise
        self._uffd = fds[0] if fds else None
        self.pid: int = hello["pid"]
        self.page_size: int = hello["page_size"]
        self.region = Region(hello["start"], hello["length"])
        self.child_uffd_fd: int | None = hello["uffd_fd"]

    def take_uffd(self) -> int | None:
        """The uffd received from the child (the caller owns it from now on)."""
        fd, self._uffd = self._uffd, None
        return fd

    def address(self, page: int) -> int:
        return self.region.start + page * self.page_size

    def write(self, runs: Sequence[Sequence[int]]) -> float:
        """Write one byte into each page of ``[first_page, pages]`` runs; the child's seconds."""
        return self.request("write", runs=[list(r) for r in runs])["seconds"]

    def write_pages(self, pages: Iterable[int]) -> float:
        return self.write(page_runs(pages))

    def read_pages(self, pages: Iterable[int]) -> None:
        self.request("read", runs=page_runs(pages))

    def start_writing(self, rate: float, seed: int = 1) -> None:
        self.request("start-writing", rate=rate, seed=seed)

    def written(self) -> int:
        """Pages written so far by the paced writer (with repeats)."""
        return self.request("written")["pages"]

    def stop_writing(self) -> int:
        return self.request("stop-writing")["pages"]

    def request(self, op: str, **args) -> dict:
        self._sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        return self._reply(op)

    def alive(self) -> bool:
        return self._process.poll() is None

    def close(self) -> None:
        """Ask the child to quit; kill it if it does not (e.g. blocked on a protected page)."""
        if self._uffd is not None:
            os.close(self._uffd)
            self._uffd = None
        if self._process.poll() is None:
            try:
                self._sock.settimeout(1.0)
                self._sock.sendall(b'{"op": "quit"}\n')
                self._process.wait(2.0)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._sock.close()
        if self._process.stderr:
            self._process.stderr.close()

    def __enter__(self) -> ScratchProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _reply(self, op: str) -> dict:
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise ScratchTimeout(f"scratch process did not answer {op!r} within {self.timeout} s") from None
            if not chunk:
                self._process.wait(5.0)
                err = self._process.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
                raise GuestError(f"scratch process exited ({self._process.returncode}) during {op!r}: {' | '.join(err)}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise GuestError(f"scratch process refused {op!r}: {reply.get('error')}")
        return reply


# --- the child's side ----------------------------------------------------------------------------------


class _Child:
    def __init__(self, memory: mmap.mmap, page_size: int) -> None:
        self.memory = memory
        self.page_size = page_size
        self.pages = len(memory) // page_size
        self.value = 0
        self._writer: threading.Thread | None = None
        self._stop = threading.Event()
        self._written = 0

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "write":
            runs = self._runs(request.get("runs"))
            self.value = self.value % 255 + 1
            started = time.perf_counter()
            for first, count in runs:
                self._write_run(first, count, self.value)
            return {"seconds": time.perf_counter() - started}
        if op == "read":
            ps = self.page_size
            for first, count in self._runs(request.get("runs")):
                self.memory[first * ps : (first + count) * ps : ps]
            return {}
        if op == "start-writing":
            rate, seed = float(request["rate"]), int(request.get("seed", 1))
            if self._writer is not None or not rate > 0:
                raise ValueError("already writing" if self._writer else f"rate must be > 0, not {rate}")
            self._stop.clear()
            self._written = 0
            self._writer = threading.Thread(target=self._write_at_rate, args=(rate, seed), daemon=True)
            self._writer.start()
            return {}
        if op == "written":
            return {"pages": self._written}
        if op == "stop-writing":
            if self._writer is not None:
                self._stop.set()
                self._writer.join()
                self._writer = None
            return {"pages": self._written}
        raise ValueError(f"unknown op {op!r}")

    def _runs(self, runs) -> list[tuple[int, int]]:
        checked = []
        for run in runs or ():
            first, count = (int(x) for x in run)
            if first < 0 or count < 1 or first + count > self.pages:
                raise ValueError(f"run [{first}, +{count}) outside the {self.pages}-page region")
            checked.append((first, count))
        return checked

    def _write_run(self, first: int, count: int, value: int) -> None:
        ps = self.page_size
        self.memory[first * ps : (first + count) * ps : ps] = bytes([value]) * count

    def _write_at_rate(self, rate: float, seed: int) -> None:
        rng = random.Random(seed)
        started = time.monotonic()
        credit_since = started
        while not self._stop.wait(PACE_TICK_S):
            now = time.monotonic()
            credit_since = max(credit_since, now - MAX_DEBT_S)
            due = int((now - credit_since) * rate)
            if due:
                credit_since += due / rate
                ps = self.page_size
                for _ in range(due):
                    self.memory[rng.randrange(self.pages) * ps] = rng.randrange(1, 256)
                self._written += due


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m migrator.tracker.scratch")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, default="async")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--populate", action="store_true", help="write every page before registering")
    parser.add_argument("--keep-uffd", action="store_true", help="keep the uffd open (for pidfd_getfd)")
    parser.add_argument("--hugetlb", action="store_true", help="map hugetlb pages (to see them refused)")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.socket_fd)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (MAP_HUGETLB if args.hugetlb else 0)
    try:
        memory = mmap.mmap(-1, args.size, flags=flags)
        page_size = mmap.PAGESIZE
        if args.populate:
            memory[0 : args.size : page_size] = b"\x01" * (args.size // page_size)
        start = _sys.buffer_address(memory)
        uffd = None if args.mode == "none" else register_for_tracking([Region(start, args.size)], args.mode)
    except Exception as exc:
        sock.sendall(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
        return 1
    hello = {"ok": True, "pid": os.getpid(), "start": start, "length": args.size, "page_size": page_size,
             "uffd_fd": uffd if args.keep_uffd else None}
    send_fds(sock, json.dumps(hello).encode() + b"\n", [uffd] if uffd is not None else [])
    if uffd is not None and not args.keep_uffd:
        os.close(uffd)  # the tracker's copy keeps the registration alive; its close ends it
    child = _Child(memory, page_size)
    for line in sock.makefile("rb"):
        try:
            request = json.loads(line)
            if request.get("op") == "quit":
                sock.sendall(b'{"ok": true}\n')
                return 0
            reply = {"ok": True, **child.handle(request)}
        except Exception as exc:  # a bad request is answered, never fatal
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sock.sendall(json.dumps(reply).encode() + b"\n")
    return 0

if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
