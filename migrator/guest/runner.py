"""The guest's writer thread: runs the workload in ~1 ms batches, paced, pausable.

States: ``restoring`` (a restore guest waiting for its pages; no steps until ``resume`` finds a
valid control block), ``running``, ``paused``. Every batch runs holding ``_batch_lock`` and
re-reads the state under it, so whoever holds the lock (``exclusive``) sees the region at a step
boundary and no step starts until it lets go. The compiled call releases the GIL, so control
requests are served while a batch runs.

With a synchronous write-protect tracker the writer can block inside a batch until the migrator
resolves the fault; control requests that need a step boundary then fail after a timeout instead
of hanging the control socket.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ..core.errors import GuestError
from .pacing import BatchSizer, Pacer, RateMeter, StopClock
from .workload import Workload

RESTORING, RUNNING, PAUSED = "restoring", "running", "paused"
T = TypeVar("T")
BOUNDARY_TIMEOUT = 5.0   # how long a request waits for the writer to reach a step boundary
AT_STEP_TIMEOUT = 60.0   # how long ``pause`` with ``at_step`` waits for the writer to get there
MAX_SLEEP = 0.01         # a throttled writer re-checks its state at least this often
MIN_SLEEP = 0.0005       # and wakes at most ~2000 times a second
# A paced writer runs a batch at most this often unless a whole batch is due: at a high rate,
# running whatever few steps came due since the last batch spun the writer's Python loop on a
# whole CPU (at 200,000 steps/s here), which a migration on the same machine then lacked.
MIN_BATCH_INTERVAL = 0.001


@dataclass(frozen=True, slots=True)
class RunnerStats:
    state: str
    steps: int
    write_rate: float    # steps (page writes) per second over about the last second


class WorkloadRunner:
    """Owns the writer thread of one workload."""

    def __init__(self, workload: Workload, *, restoring: bool = False) -> None:
        self.workload = workload
        self._cond = threading.Condition()
        self._batch_lock = threading.Lock()
        self._exclusive_waiting = 0     # callers of exclusive() waiting for the batch lock
        self._state = RESTORING if restoring else PAUSED
        self._until: int | None = None   # pause automatically once steps reach this
        self._resumed = 0                # bumped by every resume: the writer restarts its pacing
        self._quit = False
        self._meter = RateMeter()
        self._thread = threading.Thread(target=self._write_loop, name="guest-writer", daemon=True)
        self._thread.start()

    # --- control (any thread) ---------------------------------------------------------------------

    def statistics(self) -> RunnerStats:
        with self._cond:
            restoring_nothing_yet = self._state == RESTORING and self.workload.control_problem()
            steps = 0 if restoring_nothing_yet else self.workload.steps
            return RunnerStats(self._state, steps, self._meter.rate(time.monotonic(), steps))

    def resume(self, until_step: int | None = None) -> None:
        """Start or continue writing; with ``until_step``, pause by itself at exactly that step.

        A restoring guest first validates the control block it was given (GuestError if bad).
        """
        with self._cond:
            if self._state == RESTORING:
                self.workload.validate()
            steps = self.workload.steps
            if until_step is not None and until_step < steps:
                raise GuestError(f"until_step {until_step} is behind the guest (at step {steps})")
            self._until = until_step
            self._state = PAUSED if until_step == steps else RUNNING
            self._resumed += 1
            self._cond.notify_all()

    def pause(self, at_step: int | None = None, timeout: float = AT_STEP_TIMEOUT) -> int:
        """Stop at a step boundary (or let it run to exactly ``at_step``); returns the step count."""
        with self.exclusive(), self._cond:   # at a boundary: no batch can overshoot at_step
            if self._state == RESTORING:
                raise GuestError("the guest is restoring: nothing to pause")
            steps = self.workload.steps
            if at_step is None:
                self._state, self._until = PAUSED, None
                return steps
            if at_step < steps:
                raise GuestError(f"at_step {at_step} is behind the guest (at step {steps})")
            if self._state == PAUSED and steps != at_step:
                raise GuestError(f"paused at step {steps}: resume with until_step to run to step {at_step}")
            if self._state == RUNNING:
                self._until = at_step if self._until is None else min(self._until, at_step)
        with self._cond:
            if not self._cond.wait_for(lambda: self._state != RUNNING or self._quit, timeout):
                raise GuestError(f"the guest did not reach step {at_step} within {timeout:g} s")
            return self.workload.steps

    def while_restoring(self, action: Callable[[Workload], T], refusal: str) -> T:
        """Run ``action`` on the workload if the guest was never resumed, and keep it so until
        ``action`` returns (GuestError ``refusal`` otherwise). Reads nothing in the region: a
        restore guest's pages may be missing, and a touch would wait for them."""
        with self._cond:
            if self._state != RESTORING:
                raise GuestError(refusal)
            return action(self.workload)

    @contextlib.contextmanager
    def exclusive(self, timeout: float = BOUNDARY_TIMEOUT) -> Iterator[Workload]:
        """Hold the writer at a step boundary (for digest, check, tag) for the ``with`` body.

        The writer takes no new batch while someone waits here: a lock is not fair, and a writer
        that released it and took it again at once kept a waiter out for up to 0.4 s (seen: the
        ``set-tag`` that starts every migration, against a guest writing without limit)."""
        with self._cond:
            self._exclusive_waiting += 1
        try:
            acquired = self._batch_lock.acquire(timeout=timeout)
        finally:
            with self._cond:
                self._exclusive_waiting -= 1
                self._cond.notify_all()
        if not acquired:
            raise GuestError(
                f"the writer did not reach a step boundary within {timeout:g} s "
                "(blocked on a write-protected page?)"
            )
        try:
            yield self.workload
        finally:
            self._batch_lock.release()

    def stop(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._quit = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # --- the writer thread ----------------------------------------------------------------------

    def _write_loop(self) -> None:
        sizer = BatchSizer()
        pacer: Pacer | None = None
        seen_resume = -1
        schedstat = _open_schedstat()
        stops, slept = StopClock(), 0.0
        last_batch = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: (self._state == RUNNING and not self._exclusive_waiting) or self._quit)
                if self._quit:
                    return
                if seen_resume != self._resumed:
                    seen_resume = self._resumed
                    schedule = self.workload.pace()
                    pacer = Pacer(schedule, time.monotonic(), done=self.workload.steps) if schedule else None
                    stops, slept = StopClock(), 0.0
            count = sizer.size
            if pacer is not None:
                now = time.monotonic()
                if schedstat is not None:
                    on_cpu, waiting = _thread_times(schedstat)
                    pacer.forgive(stops.stopped(now, on_cpu, waiting, slept))
                due = pacer.due(now)
                if due == 0:
                    slept = min(MAX_SLEEP, max(MIN_SLEEP, pacer.seconds_until_due(now)))
                    time.sleep(slept)
                    continue
                if due < count and now - last_batch < MIN_BATCH_INTERVAL:
                    slept = MIN_BATCH_INTERVAL - (now - last_batch)
                    time.sleep(slept)
                    continue
                last_batch = now
                slept = 0.0
                count = min(count, due)
            with self._batch_lock:
                if self._state != RUNNING:
                    continue
                if self._until is not None:
                    count = min(count, self._until - self.workload.steps)
                started = time.perf_counter()
                steps = self.workload.run(count)
                sizer.observe(count, time.perf_counter() - started)
                with self._cond:
                    self._meter.record(time.monotonic(), steps)
                    if self._until is not None and steps >= self._until:
                        self._state, self._until = PAUSED, None
                        self._cond.notify_all()
            if pacer is not None:
                pacer.record(count)


def _open_schedstat() -> int | None:
    """The calling thread's scheduler statistics file (Linux with CONFIG_SCHED_INFO), or None."""
    try:
        return os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _thread_times(fd: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting for one) of the thread that opened ``fd``."""
    on_cpu, waiting, _ = os.pread(fd, 128, 0).split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9
