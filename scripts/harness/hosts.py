"""Running a migration between two testbed hosts: receiver in one, guest and migrator in the other.

Shared by ``scripts/two_hosts.py`` and the fault and hostile-input suites, so both drive the real
CLIs (``migrator receive`` / ``migrator migrate``) the same way. Processes run in their host's
namespace (``ip netns exec``); their stderr is collected line by line (``LineLog``) so a caller
can wait for a line and assert on what a failure printed. Nothing here waits without a bound.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from migrator.core.errors import GuestError
from migrator.guest.client import GuestClient
from migrator.guest.spawn import GuestProcess, spawn_guest
from .netns import Host, Testbed, entered

MIGRATOR = (sys.executable, "-m", "migrator")


class LineLog:
    """The lines a child writes to one pipe, as they come (``pump`` runs in a nursery)."""

    def __init__(self, name: str, *, echo: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.lines: list[str] = []
        self.closed = False
        self._echo = echo
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        async with stream:
            while chunk := await stream.receive_some(65536):
                *complete, pending = (pending + chunk).split(b"\n")
                for raw in complete:
                    self._add(raw.decode(errors="replace"))
        if pending:
            self._add(pending.decode(errors="replace"))
        self.closed = True
        self._wake()

    def _add(self, line: str) -> None:
        self.lines.append(line)
        if self._echo is not None:
            self._echo(line)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, needle: str, *, start: int = 0, timeout: float = 10.0) -> str:
        """The first line at or after index ``start`` containing ``needle``; TooSlowError if
        none comes within ``timeout`` (the message shows what did come)."""
        with trio.move_on_after(timeout):
            while True:
                for line in self.lines[start:]:
                    if needle in line:
                        return line
                if self.closed:
                    break
                await self._changed.wait()
        raise trio.TooSlowError(f"{self.name}: no line with {needle!r} within {timeout:g} s; got {self.lines[start:]!r}")

    async def wait_closed(self, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while not self.closed:
                await self._changed.wait()


@dataclass
class Child:
    """A CLI process started in a testbed host, with its stderr collected."""

    name: str
    process: trio.Process
    stderr: LineLog

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self, timeout: float) -> int:
        """Exit status (negative: killed by that signal), and the stderr fully read."""
        with trio.fail_after(timeout):
            status = await self.process.wait()
            await self.stderr.wait_closed(timeout)
        return status

    def kill(self, sig: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(sig)


async def start_child(
    nursery: trio.Nursery, bed: Testbed | Loopback, host: str | Host, name: str, argv: Sequence[str], *,
    stdout=subprocess.DEVNULL, echo: Callable[[str], None] | None = None,
) -> Child:
    # a session of its own: a terminal's Ctrl-C reaches only the harness, which owns the teardown
    process = await bed.open_process(
        host, argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, start_new_session=True
    )
    log = LineLog(name, echo=echo)
    nursery.start_soon(log.pump, process.stderr)
    return Child(name, process, log)


class Loopback:
    """This machine standing in for both hosts, on 127.0.0.1: the part of a ``Testbed`` that
    ``start_receiver``/``start_migrate`` use, for tests that need no link of their own (nor root).
    Use it as a context manager: on exit every process it started and that still runs is
    terminated (killed after ``STOP_TIMEOUT_S``), as a Testbed's teardown does."""

    STOP_TIMEOUT_S = 5.0

    def __init__(self, address: str = "127.0.0.1") -> None:
        self._host = Host(netns="", dev="lo", address=address)
        self._processes: list[trio.Process] = []

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc_info) -> None:
        running = [process for process in self._processes if process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + self.STOP_TIMEOUT_S
        while any(process.poll() is None for process in running) and time.monotonic() < deadline:
            time.sleep(0.02)
        for process in running:
            if process.poll() is None:
                process.kill()

    def host(self, name: str | Host) -> Host:
        return name if isinstance(name, Host) else self._host

    async def open_process(self, host: str | Host, argv: Sequence[str], **kwargs) -> trio.Process:
        process = await trio.lowlevel.open_process(list(argv), **kwargs)
        self._processes.append(process)
        return process


def write_token(directory: str, name: str = "token") -> str:
    """A fresh 32-byte hex token in a 0600 file; returns its path."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def write_certificate(directory: str, ip: str) -> tuple[str, str]:
    """A throwaway self-signed certificate for the address ``ip``, made with the openssl command:
    (cert.pem, key.pem) in ``directory``. The certificate is also what the source trusts
    (``--tls-ca``)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "1", "-subj", "/CN=migrator-test", "-addext", f"subjectAltName=IP:{ip}",
                        "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise RuntimeError("a TLS run needs the openssl command (apt-get install openssl)") from None
    return cert, key


@dataclass
class Receiver(Child):
    address: str = ""             # HOST:PORT it listens on
    report: str = ""              # its --report file (written after each migration)
    control_dir: str = ""         # where its restore guests' sockets are

    async def wait_report(self, timeout: float = 10.0) -> dict:
        """The report of its latest migration, once the file is complete (the receiver logs a
        migration's outcome first and writes the report after)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    with open(self.report) as f:
                        return json.load(f)
                except (FileNotFoundError, json.JSONDecodeError):
                    await trio.sleep(0.05)

    def restore_guests(self) -> list[dict]:
        """``stats`` of every restore guest whose socket is still answering."""
        found = []
        for name in sorted(os.listdir(self.control_dir)):
            path = os.path.join(self.control_dir, name)
            try:
                with GuestClient(path, timeout=2.0) as client:
                    found.append({"control": path, **client.stats()})
            except GuestError:
                pass   # a socket left by a guest that was killed
        return found


async def start_receiver(
    nursery: trio.Nursery, bed: Testbed | Loopback, workdir: str, *, token_file: str | None, host: str = "b",
    once: bool = True, idle_timeout: float = 30.0, extra: Sequence[str] = (),
    echo: Callable[[str], None] | None = None, ready_timeout: float = 20.0,
) -> Receiver:
    """``migrator receive`` on ``host``'s address (any port); returns once it listens. Without
    ``token_file`` it uses this user's default token file, making it if needed (the hosts share
    the file system, as two hosts sharing a copied token would)."""
    h = bed.host(host)
    control_dir = os.path.join(workdir, "dest")
    os.makedirs(control_dir, exist_ok=True)
    report = os.path.join(workdir, "dest.json")
    argv = [*MIGRATOR, "receive", "--listen", f"{h.address}:0", "--control-dir", control_dir,
            "--report", report, "--idle-timeout", str(idle_timeout), *extra]
    if token_file is not None:
        argv += ["--token-file", token_file]
    if once:
        argv.append("--once")
    child = await start_child(nursery, bed, h, "receiver", argv, echo=echo)
    receiver = Receiver(child.name, child.process, child.stderr, report=report, control_dir=control_dir)
    line = await receiver.stderr.wait_for("listening on ", timeout=ready_timeout)
    receiver.address = line.rsplit(" ", 1)[-1]
    return receiver


async def start_migrate(
    nursery: trio.Nursery, bed: Testbed | Loopback, guest_control: str, to: str, *, token_file: str | None,
    report: str | None = None, host: str = "a", extra: Sequence[str] = (), stdout=subprocess.DEVNULL,
    echo: Callable[[str], None] | None = None,
) -> Child:
    """``migrator migrate`` on ``host`` (add ``--quiet`` to ``extra`` to keep stderr to errors);
    without ``token_file``, with this user's default token, as the receiver's default."""
    argv = [*MIGRATOR, "migrate", "--guest", guest_control, "--to", to, *extra]
    if token_file is not None:
        argv += ["--token-file", token_file]
    if report is not None:
        argv += ["--report", report]
    return await start_child(nursery, bed, host, "migrate", argv, stdout=stdout, echo=echo)


def spawn_guest_in(netns: str, control: str, **kwargs) -> GuestProcess:
    """``spawn_guest`` with the guest started inside ``netns`` (blocking: call it through
    ``trio.to_thread.run_sync``; only that worker thread enters the namespace)."""
    with entered(netns):
        return spawn_guest(control, **kwargs)


def steps_advance(control: str, *, within: float = 5.0, timeout: float = 2.0) -> tuple[int, int]:
    """(steps before, steps after) once the guest at ``control`` did more steps, polling for at
    most ``within`` seconds (blocking). GuestError if it does not answer, AssertionError if it
    answers but stands still."""
    with GuestClient(control, timeout=timeout) as client:
        before = client.stats()["steps"]
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            time.sleep(0.05)
            after = client.stats()["steps"]
            if after > before:
                return before, after
    raise AssertionError(f"guest {control}: step counter stuck at {before} for {within:g} s")


def vm_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")
