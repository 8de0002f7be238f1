"""Auto-converge: slow a guest down with a SIGSTOP/SIGCONT duty cycle, and freeze it for good.

A guest that dirties pages faster than they can be sent never converges. Like QEMU's cpu-throttle,
we take a share of its run time away: every ``period_s`` it is stopped for ``duty * period_s``.

Why a daemon thread rather than a trio task: the cycle must keep its 20 ms cadence while the
engine's event loop is busy, and, more importantly, ``close()`` (which must resume the guest) and
``freeze()`` are called from cleanup paths, ``finally`` blocks and after cancellation, where
awaiting is not possible; a plain method works from sync and async code alike. ``set()`` only
stores a number, so calling it from the event loop never blocks. Signals go through a pidfd, so a
recycled pid is never signalled. Needs the right to signal the guest (same user, or CAP_KILL).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

from ..core.errors import GuestError

_ACTIVE, _FROZEN, _THAWED, _CLOSED = "active", "frozen", "thawed", "closed"
_STOPPED_STATES = ("T", "t")       # stopped by a signal, or traced and stopped


@dataclass(frozen=True)
class ThrottleStatistics:
    duty: float               # fraction of each period the guest is stopped (0 = off)
    stopped_seconds: float    # time the duty cycle kept the guest stopped (not counting freeze)
    cycles: int               # completed stop/continue cycles
    frozen: bool              # freeze() called and not thawed
    exited: bool              # the guest went away under the throttle


class Throttle:
    """Duty-cycle ``pid`` from a daemon thread. ``close()`` always leaves it running unless frozen."""

    def __init__(self, pid: int, period_s: float = 0.02) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.pid = pid
        self.period_s = period_s
        try:
            self._pidfd = os.pidfd_open(pid)
            signal.pidfd_send_signal(self._pidfd, 0)
        except ProcessLookupError as exc:
            raise GuestError(f"cannot throttle pid {pid}: no such process") from exc
        except PermissionError as exc:
            raise GuestError(f"cannot throttle pid {pid}: no right to signal it (needs the same user or CAP_KILL)") from exc
        self._cond = threading.Condition()
        self._state = _ACTIVE
        self._duty = 0.0
        self._stopped_s = 0.0
        self._cycles = 0
        self._exited = False
        self._error: GuestError | None = None
        self._thread = threading.Thread(target=self._cycle, name=f"throttle-{pid}", daemon=True)
        self._thread.start()

    def set(self, duty: float) -> None:
        """Stop the guest for ``duty`` of every period from the next cycle on (0 = run freely)."""
        if not 0 <= duty < 1:
            raise ValueError(f"duty must be in [0, 1), got {duty}")
        with self._cond:
            if self._state != _ACTIVE:
                raise RuntimeError(f"throttle of pid {self.pid} is {self._state}")
            if self._error:
                raise self._error
            self._duty = duty
            self._cond.notify_all()

    def freeze(self, timeout_s: float = 5.0) -> None:
        """End the duty cycle and stop the guest; return once every thread of it is stopped.

        Polls /proc/PID/task/*/stat (usually well under a millisecond, it is part of the downtime);
        GuestError when the guest has exited or does not stop within ``timeout_s``.
        """
        self._take_over(_FROZEN, signal.SIGSTOP)
        deadline = time.monotonic() + timeout_s
        while not self._all_stopped():
            if time.monotonic() > deadline:
                raise GuestError(f"guest pid {self.pid} did not stop within {timeout_s:g} s of SIGSTOP")
            time.sleep(0.0002)

    def thaw(self) -> None:
        """Resume a frozen guest (the duty cycle stays off)."""
        self._take_over(_THAWED, signal.SIGCONT)

    def close(self) -> None:
        """Stop the duty cycle; the guest is left running, or stopped if frozen and not thawed."""
        with self._cond:
            if self._state == _CLOSED:
                return
            resume = self._state != _FROZEN
            self._state = _CLOSED
            self._cond.notify_all()
            if resume:
                self._signal(signal.SIGCONT)
        self._thread.join()
        os.close(self._pidfd)

    def statistics(self) -> ThrottleStatistics:
        with self._cond:
            return ThrottleStatistics(
                duty=self._duty if self._state == _ACTIVE else 0.0,
                stopped_seconds=self._stopped_s,
                cycles=self._cycles,
                frozen=self._state == _FROZEN,
                exited=self._exited,
            )

    def __enter__(self) -> Throttle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _cycle(self) -> None:
        """The daemon thread. Every signal is sent under the lock, so freeze/close win races."""
        with self._cond:
            try:
                self._run_cycles()
            except GuestError as exc:
                self._error = exc       # raised again by the next set()

    def _run_cycles(self) -> None:
        while True:
            self._cond.wait_for(lambda: self._state != _ACTIVE or self._duty > 0)
            if self._state != _ACTIVE or not self._signal(signal.SIGSTOP):
                return
            duty, stopped_at = self._duty, time.monotonic()
            # Wakes early when freeze/close take over or the duty drops to 0.
            self._cond.wait_for(lambda: self._state != _ACTIVE or self._duty == 0, duty * self.period_s)
            self._stopped_s += time.monotonic() - stopped_at
            if self._state != _ACTIVE or not self._signal(signal.SIGCONT):
                return                  # freeze keeps it stopped; close has resumed it
            self._cycles += 1
            self._cond.wait_for(lambda: self._state != _ACTIVE, (1 - duty) * self.period_s)

    def _take_over(self, state: str, sig: int) -> None:
        """Stop the duty cycle (its thread sees ``state``) and send ``sig`` under the lock."""
        with self._cond:
            if self._state == _CLOSED:
                raise RuntimeError(f"throttle of pid {self.pid} is closed")
            self._state = state
            self._cond.notify_all()
            self._signal(sig)

    def _signal(self, sig: int) -> bool:
        """Send ``sig``; False (and ``exited`` set) when the guest is gone."""
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
            return True
        except ProcessLookupError:
            self._exited = True
            return False
        except OSError as exc:
            raise GuestError(f"cannot signal guest pid {self.pid}: {exc.strerror}") from exc

    def _all_stopped(self) -> bool:
        """True when every thread of the guest is stopped; GuestError when it has exited."""
        states = []
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                try:
                    states.append(_proc_state(f"/proc/{self.pid}/task/{tid}/stat"))
                except FileNotFoundError:
                    pass        # a thread that just ended
        except FileNotFoundError:
            pass
        if self._exited or not states or any(s in ("Z", "X", "x") for s in states):
            raise GuestError(f"guest pid {self.pid} exited")
        return all(s in _STOPPED_STATES for s in states)


def _proc_state(stat_path: str) -> str:
    """The state letter of a /proc/.../stat line (after the parenthesised command name)."""
    with open(stat_path, "rb") as f:
        data = f.read()
    return chr(data[data.rindex(b")") + 2])
