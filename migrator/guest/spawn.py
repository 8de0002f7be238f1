"""Start a guest as a child process (``python -m migrator guest ...``) and wait until it answers.

The caller is the guest's parent, which gives it ptrace rights over the guest under Yama
``ptrace_scope`` 1 (process_vm_readv/writev, PAGEMAP_SCAN, pidfd_getfd). Being its parent also
means reaping it: ``stop``/``kill`` wait for it, and ``reap_when_it_exits`` hands a guest that
now runs on its own (a resumed restore guest) to a thread that waits for it, so it does not
stay a zombie under a parent that keeps running (a long-lived receiver). A guest that did not
exit on its own (killed) cannot remove its control socket; the reaping removes it instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from ..core.errors import GuestError
from .client import GuestClient

READY_TIMEOUT = 60.0   # the initial fill of a large region takes a while on a fresh VM


class GuestProcess:
    """A running guest child. ``stop()`` asks it to quit, then kills it after a timeout."""

    def __init__(self, popen: subprocess.Popen, control: str, stderr) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.control = control
        self._stderr = stderr

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def client(self, timeout: float = 10.0) -> GuestClient:
        return GuestClient(self.control, timeout)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self, lines: int = 20) -> str:
        self._stderr.seek(0)
        return "\n".join(self._stderr.read().decode(errors="replace").splitlines()[-lines:])

    def kill(self) -> int:
        """SIGKILL (works on a SIGSTOPped guest too) and reap; returns the exit status."""
        if self.alive():
            self.popen.kill()
        return self.stop()

    def stop(self, timeout: float = 5.0) -> int:
        """Quit (or kill, also when stopped by SIGSTOP) and reap; returns the exit status."""
        if self.alive():
            try:
                with self.client(timeout=timeout) as client:
                    client.quit()
                self.popen.wait(timeout)
            except (GuestError, subprocess.TimeoutExpired):
                self.popen.kill()
                self.popen.wait()
        self._reaped()
        return self.popen.returncode

    def reap_when_it_exits(self) -> None:
        """Leave the guest running on its own; a daemon thread waits for it to exit and reaps it."""
        threading.Thread(target=self._wait_and_reap, name=f"reap-guest-{self.pid}", daemon=True).start()

    def _wait_and_reap(self) -> None:
        self.popen.wait()
        self._reaped()

    def _reaped(self) -> None:
        """After the guest is gone: its stderr file, and its control socket if it left one."""
        self._stderr.close()
        remove_stale_socket(self.control)


def remove_stale_socket(path: str) -> None:
    """Remove the unix socket at ``path`` if nothing listens there any more (its guest was
    killed); anything else at that path, or a socket someone answers on, is left alone."""
    with contextlib.suppress(OSError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        finally:
            probe.close()


def spawn_guest(
    control: str,
    *,
    size: int | str | None,
    dirty_rate: float | None = None,
    pattern: str = "uniform",
    fill: str = "random",
    seed: int = 1,
    memfd: bool = False,
    restore: bool = False,
    replay: str | os.PathLike | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = READY_TIMEOUT,
) -> GuestProcess:
    """Start a guest (a restore guest with ``restore``: size, control and memfd only; a guest
    replaying a trace file with ``replay``: no rate or pattern, and ``size`` may be None) and
    return once its control socket answers ``stats``; GuestError with its stderr tail if not."""
    argv = [sys.executable, "-m", "migrator", "guest", "--control", control]
    if size is not None:
        argv += ["--size", str(size)]
    if restore:
        argv.append("--restore")
    elif replay is not None:
        argv += ["--replay", os.fspath(replay), "--fill", fill, "--seed", str(seed)]
    else:
        rate = "unlimited" if dirty_rate is None else repr(float(dirty_rate))
        argv += ["--dirty-rate", rate, "--pattern", str(pattern), "--fill", fill, "--seed", str(seed)]
    if memfd:
        argv.append("--memfd")
    argv += list(extra_args)
    stderr = tempfile.TemporaryFile()
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    guest = GuestProcess(popen, control, stderr)
    deadline = time.monotonic() + ready_timeout
    while True:
        if not guest.alive():
            tail = guest.stderr_tail()
            guest.stop()
            raise GuestError(f"guest exited with status {popen.returncode} before answering: {tail}")
        if os.path.exists(control):
            try:
                with GuestClient(control, timeout=max(1.0, deadline - time.monotonic())) as client:
                    if client.stats().get("pid") == guest.pid:
                        return guest
            except GuestError:
                pass   # the socket exists but is not listening yet (or another guest's is going)
        if time.monotonic() > deadline:
            tail = guest.stderr_tail()
            guest.kill()
            raise GuestError(f"guest did not answer on {control} within {ready_timeout:g} s: {tail}")
        time.sleep(0.02)
