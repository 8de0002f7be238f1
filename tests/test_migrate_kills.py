"""``migrator migrate`` SIGKILLed at its worst moments, over loopback, with the real CLIs.

Before the commit a dead migrator must leave its source guest running (its stops were ptrace
stops) and the receiver must discard its copy; after it the source stays stopped and its state
file says which migration committed it. The moments are found from outside, the way an operator
would see them: the receiver's log line for round 0, and the guest's threads all in state ``t``
(stopped by their tracer) for the duty cycle and for the final freeze.
"""

from __future__ import annotations

import json
import re
import os
import time

import pytest

from harness.hosts import steps_advance
from harness.loopback import Cli, Receiver, stopped_for, thread_states, wait_until
from migrator.core.errors import GuestError
from migrator.guest import committed
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest

MiB = 1 << 20


def throttle_percent(round_line: str) -> int:
    """The throttle of a ``migrate`` round line (``... thr 20%``; -1 for other lines)."""
    match = re.search(r"^round .* thr (\d+)%$", round_line)
    return int(match.group(1)) if match else -1


@pytest.fixture
def receiver(sockdir):
    cli = Receiver(sockdir, "--idle-timeout", "5")
    yield cli
    cli.kill()


def source_guest(sockdir: str, *, dirty_rate: float | None, size: int = 16 * MiB):
    return spawn_guest(os.path.join(sockdir, "src.sock"), size=size, dirty_rate=dirty_rate, fill="random",
                       extra_args=["--exit-with-parent"])


def migrate(guest, receiver, *extra: str) -> Cli:
    return Cli("migrate", "--guest", guest.control, "--to", receiver.address, "--round-timeout", "30", *extra)


def assert_source_runs_and_receiver_discarded(guest, receiver) -> None:
    wait_until(lambda: not {"t", "T"} & thread_states(guest.pid), "the source guest to run again", timeout=5)
    steps_advance(guest.control, within=5.0)
    assert not os.path.exists(committed.state_path(guest.control)), "nothing was committed"
    assert receiver.wait(30) != 0, receiver.lines
    with open(receiver.report) as f:
        assert json.load(f)["result"] == "discarded"
    for name in os.listdir(receiver.control_dir):
        try:
            with GuestClient(os.path.join(receiver.control_dir, name), timeout=2) as client:
                assert client.stats()["state"] != "running", "a destination guest resumed"
        except GuestError as exc:   # a socket its killed guest left behind
            assert "cannot connect" in str(exc), exc


def test_killed_in_round_0(sockdir, receiver):
    with source_guest(sockdir, dirty_rate=2000) as guest:
        cli = migrate(guest, receiver, "--bandwidth", "4M")       # round 0 takes ~4 s
        try:
            receiver.wait_line("receiving 16 MiB into restore guest")
            time.sleep(0.5)
            assert cli.popen.poll() is None and not [line for line in cli.lines if line.startswith("round")], cli.lines  # still in round 0
            assert cli.sigkill(), cli.lines
        finally:
            cli.kill()
        assert_source_runs_and_receiver_discarded(guest, receiver)


def test_killed_while_auto_converge_holds_the_guest_stopped(sockdir, receiver):
    with source_guest(sockdir, dirty_rate=None, size=4 * MiB) as guest:   # dirties faster than it is sent
        cli = migrate(guest, receiver, "--bandwidth", "8M", "--downtime-ms", "5")
        try:
            cli.wait_line(lambda line: throttle_percent(line) > 0)
            # it is far from converging: the only stops now are the duty cycle's
            wait_until(lambda: thread_states(guest.pid) == {"t"}, "a duty-cycle stop", timeout=30)
            assert cli.sigkill(), cli.lines
        finally:
            cli.kill()
        assert_source_runs_and_receiver_discarded(guest, receiver)


def test_killed_during_the_final_freeze(sockdir, receiver):
    # a final copy of ~10 MiB at 4 MB/s keeps it frozen for seconds; a duty-cycle stop (should the
    # policy throttle a round) lasts under a period, 20 ms
    with source_guest(sockdir, dirty_rate=1000) as guest:
        cli = migrate(guest, receiver, "--bandwidth", "4M", "--downtime-ms", "5000", "--max-rounds", "2")
        try:
            receiver.wait_line("receiving 16 MiB into restore guest")
            wait_until(lambda: stopped_for(guest.pid, 0.1), "the freeze", timeout=30)
            assert cli.sigkill(), cli.lines
        finally:
            cli.kill()
        assert_source_runs_and_receiver_discarded(guest, receiver)


def test_a_committed_source_stays_stopped_and_says_so(sockdir, receiver):
    with source_guest(sockdir, dirty_rate=1000) as guest:
        cli = migrate(guest, receiver, "--keep-source", "--quiet")
        assert cli.wait() == 0, cli.lines
        assert receiver.wait(30) == 0, receiver.lines
        with open(receiver.report) as f:
            dest = json.load(f)
        assert dest["result"] == "resumed"
        with GuestClient(dest["guest_control"], timeout=5) as client:
            client.quit()     # the migrated copy is not under test here
        wait_until(lambda: thread_states(guest.pid) == {"T"}, "the committed source's group-stop", timeout=5)
        record = committed.read_record(guest.control)
        assert record is not None and record.applies_to(guest.pid) and record.destination == receiver.address
        assert record.migrator_pid == cli.popen.pid and len(record.migration) == 32
        with GuestClient(guest.control, timeout=2) as client:
            with pytest.raises(GuestError, match=f"refusing to thaw guest pid {guest.pid}: migration {record.migration}"):
                client.thaw()
        time.sleep(0.2)
        assert thread_states(guest.pid) == {"T"}
