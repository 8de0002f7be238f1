"""Who holds a guest's stop: a throttle in a helper process, killed at the worst moments.

Before the commit a stop belongs to whoever holds it and ends with it; after ``commit`` it is
permanent and the guest's state file says so. The helper is a separate process (the throttle
traces the guest from there), so this process may wait for its guest child as usual.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from harness.hosts import steps_advance
from migrator.core.errors import GuestError
from migrator.guest import committed
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.source.throttle import Throttle
from migrator.tracker import _sys

HOLDER = r"""
import sys, time
from migrator.source.throttle import Throttle
pid, action = int(sys.argv[1]), sys.argv[2]
throttle = Throttle(pid)
if action == "throttle":
    throttle.set(0.9)
if action in ("freeze", "commit"):
    throttle.freeze()
if action == "commit":
    throttle.commit("test-migration", control=sys.argv[3], destination="192.0.2.1:7000")
print("holding", flush=True)
time.sleep(600)
"""

SEIZER = r"""
import sys, time
from migrator.tracker import _sys
_sys.ptrace_seize(int(sys.argv[1]), 0)
print("seized", flush=True)
time.sleep(600)
"""


def _scope_forbids_siblings() -> str | None:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
    except OSError:
        return None
    if scope >= 1 and os.geteuid() != 0:
        return f"Yama ptrace_scope {scope}: a helper process may not trace its sibling"
    return None


pytestmark = pytest.mark.skipif(_scope_forbids_siblings() is not None, reason=str(_scope_forbids_siblings()))


def thread_states(pid: int) -> list[str]:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        states.append(chr(data[data.rindex(b")") + 2]))
    return sorted(states)


def wait_until(condition, what: str, timeout: float = 10.0, interval: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def all_stopped(pid: int, letter: str) -> bool:
    states = thread_states(pid)
    return bool(states) and set(states) == {letter}


def stays(pid: int, letter: str, seconds: float = 0.3) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not all_stopped(pid, letter):
            return False
        time.sleep(0.01)
    return True


def start_helper(script: str, *args: str, ready: str, timeout: float = 30.0) -> subprocess.Popen:
    helper = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    readable, _, _ = select.select([helper.stdout], [], [], timeout)
    line = helper.stdout.readline() if readable else ""
    if ready not in line:
        helper.kill()
        _, err = helper.communicate(timeout=10)
        pytest.fail(f"helper did not say {ready!r} within {timeout:g} s: {line!r} {err[-2000:]}")
    return helper


def sigkill(helper: subprocess.Popen) -> None:
    helper.kill()
    assert helper.wait(timeout=10) == -signal.SIGKILL


@pytest.fixture
def guest(sockdir):
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 << 20, dirty_rate=20_000, fill="sparse",
                     extra_args=["--exit-with-parent"]) as g:
        yield g


def assert_runs_again(guest) -> None:
    wait_until(lambda: not {"t", "T"} & set(thread_states(guest.pid)), "the guest to run again", timeout=5)
    steps_advance(guest.control, within=5.0)
    assert not os.path.exists(committed.state_path(guest.control))


def test_killing_the_throttle_mid_stop_leaves_the_guest_running(guest):
    holder = start_helper(HOLDER, guest.pid, "throttle", ready="holding")
    try:
        wait_until(lambda: all_stopped(guest.pid, "t"), "the duty cycle to stop the guest")
        sigkill(holder)            # while the guest is stopped: nobody will ever send SIGCONT
    finally:
        holder.kill()
    assert_runs_again(guest)


def test_killing_the_freeze_leaves_the_guest_running(guest):
    holder = start_helper(HOLDER, guest.pid, "freeze", ready="holding")
    try:
        assert stays(guest.pid, "t"), thread_states(guest.pid)
        sigkill(holder)
    finally:
        holder.kill()
    assert_runs_again(guest)


def test_after_the_commit_the_guest_stays_stopped_and_says_why(guest):
    holder = start_helper(HOLDER, guest.pid, "commit", guest.control, ready="holding")
    try:
        assert stays(guest.pid, "t")
        sigkill(holder)
    finally:
        holder.kill()
    wait_until(lambda: all_stopped(guest.pid, "T"), "the guest to enter its group-stop")
    assert stays(guest.pid, "T", 0.5), "a committed guest ran again once its migrator died"

    path = committed.state_path(guest.control)
    with open(path) as f:
        doc = json.load(f)
    assert doc["state"] == "committed" and doc["migration"] == "test-migration"
    assert doc["destination"] == "192.0.2.1:7000" and doc["pid"] == guest.pid
    assert doc["committed_at"].endswith("Z") and doc["migrator_pid"] == holder.pid

    with GuestClient(guest.control, timeout=2.0) as client:   # connects although the guest is stopped
        assert client.pid == guest.pid
        assert client.commit_record().migration == "test-migration"
        for refused in (client.thaw, client.resume):
            with pytest.raises(GuestError) as error:
                refused()
            message = str(error.value)
            assert "\n" not in message and "test-migration" in message and path in message, message
    assert stays(guest.pid, "T", 0.2)

    os.kill(guest.pid, signal.SIGCONT)         # a plain kill -CONT: the guest stops itself again
    wait_until(lambda: all_stopped(guest.pid, "T"), "the committed guest to stop itself again")
    assert stays(guest.pid, "T", 0.3)
    assert "stopping again" in guest.stderr_tail()

    os.unlink(path)                            # the operator's decision: run it after all
    with GuestClient(guest.control, timeout=5.0) as client:
        client.thaw()
        steps_advance(guest.control, within=5.0)


def test_a_killed_committed_guest_is_let_go_without_waiting_and_its_state_file_goes(guest):
    """After the commit the migrator kills its guest: close lets go at once (nothing waits for
    the kernel to free the guest's memory), the state file is removed, and the guest dies."""
    throttle = Throttle(guest.pid)
    pidfd = os.pidfd_open(guest.pid)
    try:
        throttle.freeze()
        throttle.commit("m-killed", control=guest.control, destination="192.0.2.1:7000")
        assert os.path.exists(committed.state_path(guest.control))
        throttle.kill()
        throttle.close()
        assert not os.path.exists(committed.state_path(guest.control)), "a killed guest keeps no state file"
        readable, _, _ = select.select([pidfd], [], [], 10)
        assert readable, "the killed guest is still alive"
    finally:
        throttle.close()
        os.close(pidfd)
    # The tracer thread of this process may have reaped the exit first (then Popen sees ECHILD
    # and reports 0); a frozen guest cannot exit on its own, so either way the kill ended it.
    assert guest.popen.wait(timeout=10) in (-signal.SIGKILL, 0)


def test_the_guest_refuses_resume_when_its_state_file_names_it(guest):
    with GuestClient(guest.control) as client:
        client.pause()
        committed.StagedRecord(guest.control, committed.new_record(guest.pid, "m-1", "x:1")).publish()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:   # past the client's own check
            raw.settimeout(10)
            raw.connect(guest.control)
            raw.sendall(b'{"cmd":"resume"}\n')
            reply = json.loads(raw.recv(65536))
        assert not reply["ok"] and "refusing to resume" in reply["error"] and "m-1" in reply["error"]
        os.unlink(committed.state_path(guest.control))
        client.resume()
        steps_advance(guest.control)


def test_a_commit_that_cannot_write_its_state_file_changes_nothing(guest):
    throttle = Throttle(guest.pid)
    try:
        throttle.freeze()
        with pytest.raises(GuestError, match="cannot write the state file /nonexistent/"):
            throttle.commit("m-2", control="/nonexistent/g.sock")
        assert not throttle.statistics().committed
        throttle.thaw()
    finally:
        throttle.close()
    assert_runs_again(guest)


def test_closing_a_committed_throttle_keeps_it_stopped_and_a_killed_guest_loses_its_file(sockdir):
    with spawn_guest(os.path.join(sockdir, "k.sock"), size=16 << 20, dirty_rate=20_000, fill="sparse",
                     extra_args=["--exit-with-parent"]) as guest:
        with Throttle(guest.pid) as throttle:
            throttle.freeze()
            record = throttle.commit("m-3", control=guest.control, destination="d:1")
            assert throttle.statistics().committed and record.pid == guest.pid
            with pytest.raises(GuestError, match="committed"):
                throttle.thaw()
        wait_until(lambda: all_stopped(guest.pid, "T"), "the group-stop after close")
        assert stays(guest.pid, "T")
        assert committed.read_record(guest.control).migration == "m-3"

        with Throttle(guest.pid) as throttle:      # the next migrator takes over, and kills it
            throttle.freeze()
            record = throttle.commit("m-4", control=guest.control)
            os.kill(guest.pid, signal.SIGKILL)
        assert not os.path.exists(committed.state_path(guest.control))


def test_an_already_traced_guest_is_refused_with_one_line(guest):
    seizer = start_helper(SEIZER, guest.pid, ready="seized")
    try:
        with pytest.raises(GuestError) as error:
            Throttle(guest.pid)
        message = str(error.value)
        assert "\n" not in message and f"already traced by pid {seizer.pid}" in message, message

        cli = subprocess.run([sys.executable, "-m", "migrator", "migrate", "--guest", guest.control,
                              "--to", "127.0.0.1:9", "--insecure", "--quiet"], capture_output=True, text=True, timeout=60)
        lines = [line for line in cli.stderr.splitlines() if line.strip()]
        assert cli.returncode != 0 and len(lines) == 1, cli.stderr
        assert lines[0].startswith("migrator: ") and f"already traced by pid {seizer.pid}" in lines[0], lines
    finally:
        seizer.kill()
        seizer.wait(timeout=10)
    steps_advance(guest.control)


def test_ptrace_wrappers_name_the_call_and_the_thread():
    with pytest.raises(ProcessLookupError, match=r"PTRACE_INTERRUPT of thread 1: No such process"):
        _sys.ptrace_interrupt(1)     # pid 1 is not our tracee
