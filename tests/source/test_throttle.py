"""Auto-converge against a real busy child that counts in a shared file mapping."""

import mmap
import os
import struct
import subprocess
import sys
import threading
import time

import pytest

from migrator.core.errors import GuestError
from migrator.source.throttle import Throttle, _proc_state

COUNTER = r"""
import mmap, sys, threading, time
threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()   # freeze must stop it too
with open(sys.argv[1], "r+b") as f:
    view = memoryview(mmap.mmap(f.fileno(), 8)).cast("Q")
i = 0
while True:
    i += 1
    view[0] = i
"""


class Child:
    def __init__(self, path):
        path.write_bytes(bytes(8))
        self.proc = subprocess.Popen([sys.executable, "-c", COUNTER, str(path)])
        self.pid = self.proc.pid
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 8)
        self.wait_for(lambda: self.count() > 0, "the child to start counting")

    def count(self) -> int:
        return struct.unpack_from("Q", self._map)[0]

    def progress(self, seconds: float) -> int:
        before = self.count()
        time.sleep(seconds)
        return self.count() - before

    def state(self) -> str:
        return _proc_state(f"/proc/{self.pid}/stat")

    def thread_states(self) -> list[str]:
        return [_proc_state(f"/proc/{self.pid}/task/{tid}/stat") for tid in os.listdir(f"/proc/{self.pid}/task")]

    def wait_for(self, condition, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, "child died"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.001)


@pytest.fixture
def child(tmp_path):
    c = Child(tmp_path / "counter")
    yield c
    c.proc.kill()
    c.proc.wait(timeout=10)


def test_half_duty_roughly_halves_progress(child):
    with Throttle(child.pid) as throttle:
        free_before = child.progress(0.4)
        throttle.set(0.5)
        throttled = child.progress(0.8) / 2
        throttle.set(0)
        free_after = child.progress(0.4)
        stats = throttle.statistics()
    ratio = throttled / ((free_before + free_after) / 2)
    assert 0.15 < ratio < 0.85, (free_before, throttled, free_after)
    assert stats.cycles >= 10 and 0.15 < stats.stopped_seconds < 0.7, stats
    assert child.state() != "T"


def test_freeze_really_stops_and_close_keeps_it_frozen(child):
    throttle = Throttle(child.pid)
    throttle.set(0.3)
    time.sleep(0.05)
    throttle.freeze()
    assert child.thread_states() == ["T", "T"]
    assert child.progress(0.1) == 0
    assert throttle.statistics().frozen
    throttle.close()
    assert child.state() == "T" and child.progress(0.05) == 0


def test_thaw_resumes_a_frozen_guest(child):
    with Throttle(child.pid) as throttle:
        throttle.freeze()
        assert child.progress(0.05) == 0
        throttle.thaw()
        assert child.progress(0.05) > 0
        with pytest.raises(RuntimeError, match="thawed"):
            throttle.set(0.5)


def test_close_always_resumes(child):
    throttle = Throttle(child.pid)
    throttle.set(0.9)
    child.wait_for(lambda: child.state() == "T", "the duty cycle to stop the child")
    throttle.close()
    assert child.progress(0.1) > 0
    assert child.state() != "T"


def test_killing_the_guest_does_not_crash_the_thread(child, monkeypatch):
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    throttle = Throttle(child.pid, period_s=0.005)
    throttle.set(0.5)
    time.sleep(0.05)
    child.proc.kill()
    with pytest.raises(GuestError, match="exited"):
        throttle.freeze()               # a zombie never stops
    child.proc.wait(timeout=10)
    throttle.close()
    assert not crashes


def test_reaped_guest_stops_the_cycle_quietly(child, monkeypatch):
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    throttle = Throttle(child.pid, period_s=0.005)
    throttle.set(0.5)
    child.proc.kill()
    child.proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not throttle.statistics().exited:
        assert time.monotonic() < deadline, "the cycle never noticed the guest was gone"
        time.sleep(0.005)
    throttle.close()
    assert not crashes


def test_bad_input(child):
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(GuestError, match="no such process"):
        Throttle(gone.pid)
    with Throttle(child.pid) as throttle:
        with pytest.raises(ValueError, match=r"duty must be in \[0, 1\)"):
            throttle.set(1.0)
    with pytest.raises(ValueError, match="period_s"):
        Throttle(1, period_s=0)


def test_a_paced_guest_does_not_repay_the_time_the_throttle_stopped_it(tmp_path):
    """The guest paces by the wall clock; a 50 % duty cycle must still halve what it writes."""
    from migrator.guest.spawn import spawn_guest

    rate = 20_000
    with spawn_guest(str(tmp_path / "g.sock"), size=64 << 20, dirty_rate=rate, fill="sparse") as guest:
        client = guest.client()

        def steps_per_second(seconds: float = 1.0) -> float:
            before = client.stats()["steps"]
            time.sleep(seconds)
            return (client.stats()["steps"] - before) / seconds

        free = steps_per_second()
        with Throttle(guest.pid) as throttle:
            throttle.set(0.5)
            time.sleep(0.2)
            throttled = steps_per_second()
        assert free > 0.8 * rate, f"the unthrottled guest writes {free:.0f}/s, not {rate}"
        assert throttled < 0.7 * free, f"throttled at 50 % it still writes {throttled:.0f}/s against {free:.0f}/s"
        client.close()
