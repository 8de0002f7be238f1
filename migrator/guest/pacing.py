"""Timing decisions of the guest's writer, as pure objects fed with clock readings.

The writer runs the compiled loop in batches: each call should take about a millisecond, long
enough that Python overhead is negligible, short enough that pause and digest requests get a
step boundary quickly. A throttled guest paces by the wall clock (steps due since it started),
not by sleeping fixed amounts, so time lost to the scheduler (waiting for a CPU) is made up.
Time the writer was *stopped* is not: a migrator's auto-converge takes run time away with a
SIGSTOP/SIGCONT duty cycle (a few ms every 20 ms), and a guest that repaid every stop with a burst
would never slow down. ``StopClock`` tells the two apart from the thread's scheduler statistics
(time on a CPU, time waiting for one): wall time that is neither, nor the writer's own sleep, was
spent stopped, and the pacer forgives it. Debt beyond ``max_debt`` seconds is forgiven too (a
stop the clock could not see, a long freeze).
"""

from __future__ import annotations

from collections import deque

BATCH_SECONDS = 0.001
MAX_BATCH = 1 << 20
MAX_DEBT_SECONDS = 0.1


class BatchSizer:
    """Steps per call so that a call takes about ``target`` seconds."""

    def __init__(self, target: float = BATCH_SECONDS, initial: int = 64) -> None:
        self.target = target
        self.size = initial
        self._per_step: float | None = None

    def observe(self, steps: int, seconds: float) -> None:
        if steps <= 0:
            return
        per_step = max(seconds, 1e-9) / steps
        self._per_step = per_step if self._per_step is None else 0.7 * self._per_step + 0.3 * per_step
        self.size = max(1, min(MAX_BATCH, int(self.target / self._per_step)))


class Steady:
    """A schedule of ``rate`` steps per second (``Pacer``'s other schedule is a replay's
    ``replay.ReplayTimeline``): how many steps are due at a time, and when a step is."""

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate {rate}: must be positive")
        self.rate = rate

    def steps_at(self, position: float) -> float:
        return position * self.rate

    def seconds_at(self, steps: int) -> float:
        return steps / self.rate


class Pacer:
    """How many steps are due at ``now`` to follow ``schedule`` (a rate in steps per second, or
    an object with ``steps_at(seconds)`` and ``seconds_at(steps)``) since ``start``, when
    ``done`` steps were already done then (a resumed replay carries on where its steps are)."""

    def __init__(self, schedule, start: float, max_debt: float = MAX_DEBT_SECONDS, done: int = 0) -> None:
        self.schedule = Steady(schedule) if isinstance(schedule, (int, float)) else schedule
        self.max_debt = max_debt
        self._done = done
        self._origin = start - self.schedule.seconds_at(done)

    def due(self, now: float) -> int:
        """Steps owed now; never more than ``max_debt`` seconds' worth from when the next step
        was due (the rest is forgiven; a replay's pause between intervals is not debt)."""
        behind = now - self._origin - self.schedule.seconds_at(self._done + 1)
        if behind > self.max_debt:
            self._origin += behind - self.max_debt
        owed = self.schedule.steps_at(now - self._origin) - self._done
        return int(owed + 1e-9) if owed >= 1 - 1e-9 else 0

    def seconds_until_due(self, now: float) -> float:
        """How long until at least one more step is due."""
        return max(0.0, self._origin + self.schedule.seconds_at(self._done + 1) - now)

    def record(self, steps: int) -> None:
        self._done += steps

    def forgive(self, seconds: float) -> None:
        """Owe nothing for ``seconds`` of the past (the writer was stopped meanwhile)."""
        self._origin += seconds


STOP_THRESHOLD = 0.0005   # gaps shorter than this are timer and accounting noise


class StopClock:
    """Seconds a thread spent stopped between readings: wall time that was neither on a CPU, nor
    waiting for one, nor the thread's own sleep. Fed with clock readings, so it is pure."""

    def __init__(self) -> None:
        self._last: tuple[float, float, float] | None = None

    def stopped(self, wall: float, on_cpu: float, waiting: float, slept: float = 0.0) -> float:
        """``on_cpu``/``waiting``: the thread's cumulative seconds (``/proc/thread-self/schedstat``);
        ``slept``: how long it chose to sleep since the last reading."""
        last, self._last = self._last, (wall, on_cpu, waiting)
        if last is None:
            return 0.0
        gap = (wall - last[0]) - (on_cpu - last[1]) - (waiting - last[2]) - slept
        return gap if gap > STOP_THRESHOLD else 0.0


class RateMeter:
    """Steps per second over about the last ``window`` seconds (not thread-safe: guard it)."""

    def __init__(self, window: float = 1.0, resolution: float = 0.01) -> None:
        self.window = window
        self.resolution = resolution
        self._samples: deque[tuple[float, int]] = deque()

    def record(self, now: float, steps: int) -> None:
        if self._samples and now - self._samples[-1][0] < self.resolution:
            return
        self._samples.append((now, steps))
        self._prune(now)

    def rate(self, now: float, steps: int) -> float:
        self._prune(now)
        if not self._samples:
            return 0.0
        t0, s0 = self._samples[0]
        return (steps - s0) / (now - t0) if now > t0 else 0.0

    def _prune(self, now: float) -> None:
        # keep the newest sample at or before the window's start, so the rate spans the window
        while len(self._samples) >= 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
