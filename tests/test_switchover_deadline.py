"""A receiver that stalls during the switch-over must not hold the source frozen.

The switch-over has its own deadline (``--switchover-timeout``, by default derived from the
downtime target): past it, before the commit, the migration aborts with one line naming the step
that stalled, and the source guest runs again.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import trio

from harness.hosts import steps_advance
from harness.loopback import Receiver, thread_states, wait_until
from migrator.core.errors import MigrationFailed
from migrator.core.tokens import load_default_token
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.source.switchover import MIN_DEADLINE_S, switchover_deadline_s

MiB = 1 << 20


def test_the_deadline_follows_the_target_and_the_verification():
    assert switchover_deadline_s(10, verify="pages", region_bytes=1 << 30) == MIN_DEADLINE_S
    assert switchover_deadline_s(500, verify="pages", region_bytes=1 << 30) == 20.0
    assert switchover_deadline_s(10, verify="full", region_bytes=4 << 30) == MIN_DEADLINE_S + 8.0


async def test_a_receiver_stalled_in_the_switch_over_aborts_it_and_the_source_runs_on(sockdir):
    receiver = Receiver(sockdir, "--idle-timeout", "30")
    try:
        with spawn_guest(os.path.join(sockdir, "src.sock"), size=16 * MiB, dirty_rate=200, fill="random",
                         extra_args=["--exit-with-parent"]) as guest:

            def stall_the_receiver(stats) -> None:   # round 0 is acknowledged: the switch-over comes next
                receiver.popen.send_signal(signal.SIGSTOP)

            # a target that round 0 already meets and no settling, so the switch-over follows it at once
            settings = MigrateSettings(downtime_ms=5000, switchover_timeout_s=1.0, round_timeout_s=30, switch_asap=True,
                                       token=load_default_token())   # the one the receiver made
            migration = SourceMigration(guest.control, receiver.address, settings, on_round=stall_the_receiver)
            started = time.monotonic()
            with pytest.raises(MigrationFailed) as failed:
                with trio.fail_after(20):
                    await migration.run()
            elapsed = time.monotonic() - started
            assert not failed.value.committed
            assert "the switch-over stalled at 'the destination's verification'" in str(failed.value)
            assert "--switchover-timeout" in str(failed.value)
            assert elapsed < 10, f"the stall held the migration {elapsed:.1f} s"
            wait_until(lambda: not {"t", "T"} & thread_states(guest.pid), "the source guest to run", timeout=5)
            steps_advance(guest.control, within=5.0)
            receiver.popen.send_signal(signal.SIGCONT)
            assert receiver.wait(30) != 0, "the receiver discarded its copy"
    finally:
        receiver.popen.send_signal(signal.SIGCONT)
        receiver.kill()
