"""Auto-converge and the final freeze, with stops that end with the migrator until it commits.

A guest that dirties pages faster than they can be sent never converges. Like QEMU's cpu-throttle,
we take a share of its run time away: every ``period_s`` it is stopped for ``duty * period_s``.
For the switch-over it is frozen; at the point of no return ``commit`` makes that stop permanent.

Every stop is a ptrace stop (``migrator.source.freeze``): if the migrator dies, however, before
the commit, the kernel detaches the guest and it runs on. After ``commit`` a queued SIGSTOP takes
over, so the guest stays stopped whatever happens to us, and its state file
(``migrator.guest.committed``) says which migration committed it.

Why a daemon thread: ptrace takes requests only from the thread that seized the tracee, and a
traced guest's every stop (a signal, a new thread) waits until its tracer answers; so one thread
owns the guest for the throttle's whole life, keeps the duty cycle's cadence while the event loop
is busy, and answers the guest's stops (it looks every ``POLL_S`` while the guest runs: waitpid
cannot be woken by a condition variable). The other threads talk to it through commands: ``set``
only stores a number; ``freeze``, ``thaw``, ``commit`` and ``close`` wait (boundedly) for it to
carry them out. They are plain methods, so cleanup paths (``finally`` blocks, after cancellation)
call them from sync and async code alike.

Needs ptrace-attach rights over the guest (the rights ``process_vm_readv`` needs) and refuses a
guest that is already traced, naming its tracer.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass

from ..core.errors import GuestError
from ..guest import committed
from .freeze import GuestStopper

_ACTIVE, _FROZEN, _THAWED, _COMMITTED, _CLOSED = "active", "frozen", "thawed", "committed", "closed"
POLL_S = 0.005          # how long a traced, running guest may wait for its stops to be answered
HELD_POLL_S = 0.1       # while every thread is held, only exits can happen
START_TIMEOUT_S = 10.0  # seizing a guest's threads (one syscall each)
COMMAND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ThrottleStatistics:
    duty: float               # fraction of each period the guest is stopped (0 = off)
    stopped_seconds: float    # time the duty cycle kept the guest stopped (not counting freeze)
    cycles: int               # completed stop/continue cycles
    frozen: bool              # freeze() called and not thawed (also true once committed)
    exited: bool              # the guest went away under the throttle
    committed: bool           # commit() made the stop permanent
    threads: int              # guest threads traced
    freeze_seconds: float     # the last stop of the whole guest (freeze or duty cycle): from the
                              # first PTRACE_INTERRUPT to the last thread's stop reported by waitpid
    signals_forwarded: int    # signals the guest received while traced, re-injected


@dataclass
class _Command:
    name: str
    args: tuple
    future: Future


class Throttle:
    """Duty-cycle and freeze ``pid`` from a daemon thread that traces it. ``close()`` leaves the
    guest running, or stopped if someone else stopped it, or stopped for good once committed."""

    def __init__(self, pid: int, period_s: float = 0.02) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.pid = pid
        self.period_s = period_s
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError as exc:
            raise GuestError(f"cannot throttle pid {pid}: no such process") from exc
        self._cond = threading.Condition()
        self._commands: list[_Command] = []
        self._state = _ACTIVE
        self._duty = 0.0
        self._stopped_s = 0.0
        self._cycles = 0
        self._exited = False
        self._threads = 0
        self._freeze_s = 0.0
        self._forwarded = 0
        self._error: GuestError | None = None
        self._commit_path: str | None = None
        self._killed = False
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"throttle-{pid}", daemon=True)
        self._thread.start()
        try:
            ready.result(START_TIMEOUT_S)
        except FutureTimeout:
            with self._cond:     # if it gets there after all, the thread lets go at once
                self._state = _CLOSED
                self._commands.append(_Command("close", (), Future()))
            raise GuestError(f"cannot throttle pid {pid}: seizing its threads took more than {START_TIMEOUT_S:g} s") from None
        except GuestError:
            self._thread.join(START_TIMEOUT_S)
            os.close(self._pidfd)
            raise

    # --- the API ---------------------------------------------------------------------------------

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

    def freeze(self, timeout_s: float = 5.0) -> float:
        """End the duty cycle and stop the guest; return once waitpid has reported every thread
        stopped, with the seconds that took (from the first PTRACE_INTERRUPT to the last stop).

        GuestError when the guest has exited or does not stop within ``timeout_s`` (``thaw`` or
        ``close`` then sort it out once the stop completes)."""
        with self._cond:
            if self._state == _COMMITTED:
                return self._freeze_s
            self._take_over(_FROZEN)
            future = self._post("freeze")
        try:
            return future.result(timeout_s)
        except FutureTimeout:
            raise GuestError(f"guest pid {self.pid} did not stop within {timeout_s:g} s") from None

    def thaw(self) -> None:
        """Resume a frozen guest (the duty cycle stays off). Refused once committed."""
        with self._cond:
            if self._state == _COMMITTED:
                raise GuestError(f"guest pid {self.pid} was committed: it must not resume")
            self._take_over(_THAWED)
            future = self._post("thaw")
        self._wait(future, "thaw")

    def commit(self, migration: str, *, control: str, destination: str = "", layout=None,
               switch_round: int | None = None) -> committed.CommitRecord:
        """The point of no return, before Commit is sent: make the freeze's stop permanent (it then
        survives the migrator) and record it in the guest's state file beside ``control``, with
        the migration's ``layout`` (a ``MemoryLayout``) and, for a post-copy, its ``switch_round``:
        what a later ``migrate --resume`` needs from a guest that answers nothing while stopped.

        Either everything is done or nothing is (GuestError, the guest still frozen and ours to
        thaw): the state file is staged first, then the SIGSTOP queued, then the file renamed."""
        with self._cond:
            if self._state != _FROZEN:
                raise RuntimeError(f"throttle of pid {self.pid} is {self._state}, not frozen")
            future = self._post("commit", migration, control, destination, layout, switch_round)
        record = self._wait(future, "commit", definitive=True)
        with self._cond:
            self._state = _COMMITTED
            self._commit_path = control
        return record

    def kill(self) -> None:
        """SIGKILL the guest (through the pidfd: never a recycled pid) once its copy lives on
        elsewhere; ``close`` then lets go without waiting for its exit, which for a large guest
        is tens of milliseconds of the kernel freeing its memory and no part of the migration,
        and removes its state file: a killed guest never runs again."""
        with self._cond:
            self._killed = True
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Let go of the guest: it runs on, unless it is in someone else's group-stop, or committed
        (then it stays stopped for good). Removes the state file of a committed guest that is gone
        or killed."""
        with self._cond:
            if self._state == _CLOSED:
                return
            self._state = _CLOSED
            future = self._post("close")
        if future is not None:
            try:
                self._wait(future, "close")
            except GuestError:
                pass    # the thread is stuck on a thread that will not stop: it lets go when it can
        self._thread.join(COMMAND_TIMEOUT_S)
        os.close(self._pidfd)

    def statistics(self) -> ThrottleStatistics:
        with self._cond:
            return ThrottleStatistics(
                duty=self._duty if self._state == _ACTIVE else 0.0,
                stopped_seconds=self._stopped_s,
                cycles=self._cycles,
                frozen=self._state in (_FROZEN, _COMMITTED),
                exited=self._exited,
                committed=self._state == _COMMITTED,
                threads=self._threads,
                freeze_seconds=self._freeze_s,
                signals_forwarded=self._forwarded,
            )

    def __enter__(self) -> Throttle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- talking to the thread -------------------------------------------------------------------

    def _take_over(self, state: str) -> None:
        if self._state == _CLOSED:
            raise RuntimeError(f"throttle of pid {self.pid} is closed")
        self._state = state
        self._cond.notify_all()

    def _post(self, name: str, *args) -> Future | None:
        """Queue a command for the thread (caller holds the lock); None when the thread has ended."""
        future: Future = Future()
        if not self._thread.is_alive():
            if self._error and name not in ("thaw", "close"):
                raise self._error
            if name == "freeze" or name == "commit":
                raise GuestError(f"guest pid {self.pid} exited")
            return None
        self._commands.append(_Command(name, args, future))
        self._cond.notify_all()
        return future

    def _wait(self, future: Future | None, name: str, *, definitive: bool = False):
        """The command's result within COMMAND_TIMEOUT_S. A ``definitive`` command that has started
        is waited for to the end: whether it happened must never be a guess."""
        if future is None:
            return None
        try:
            return future.result(COMMAND_TIMEOUT_S)
        except FutureTimeout:
            if definitive and not future.cancel():
                return future.result()
            future.cancel()
            raise GuestError(f"throttle of pid {self.pid}: {name} not done within {COMMAND_TIMEOUT_S:g} s") from None

    # --- the thread --------------------------------------------------------------------------------

    def _run(self, ready: Future) -> None:
        try:
            stopper = GuestStopper(self.pid)
        except GuestError as exc:
            ready.set_exception(exc)
            return
        except OSError as exc:
            ready.set_exception(GuestError(f"cannot freeze guest pid {self.pid}: {exc}"))
            return
        ready.set_result(None)
        try:
            self._serve(stopper)
        except (GuestError, OSError) as exc:
            error = exc if isinstance(exc, GuestError) else GuestError(f"tracing guest pid {self.pid} failed: {exc}")
            with self._cond:
                self._error = error
                self._exited = self._exited or stopper.gone
                commands, self._commands = self._commands, []
            for command in commands:
                if command.future.set_running_or_notify_cancel():
                    command.future.set_exception(error)
            # returning ends this thread, and the kernel detaches what it still traces

    def _serve(self, stopper: GuestStopper) -> None:
        phase_stopped = False       # the duty cycle holds the guest now
        edge = 0.0                  # when the duty cycle's current phase ends
        stopped_at = 0.0
        while True:
            with self._cond:
                now = time.monotonic()
                if stopper.gone:
                    timeout = HELD_POLL_S
                elif stopper.holding:
                    timeout = edge - now if phase_stopped else HELD_POLL_S
                elif self._state == _ACTIVE and self._duty > 0:
                    timeout = min(POLL_S, edge - now)
                else:
                    timeout = POLL_S
                if not self._commands and timeout > 0:
                    self._cond.wait(timeout)
                commands, self._commands = self._commands, []
                state, duty = self._state, self._duty
            for command in commands:
                if not command.future.set_running_or_notify_cancel():
                    continue
                if phase_stopped and command.name in ("freeze", "thaw", "close"):
                    phase_stopped = False
                    self._add_stopped(time.monotonic() - stopped_at)
                try:
                    result = self._execute(stopper, command)
                except OSError as exc:
                    command.future.set_exception(GuestError(f"{command.name} of guest pid {self.pid} failed: {exc}"))
                except Exception as exc:    # GuestError, or a misuse (RuntimeError): the caller's to raise
                    command.future.set_exception(exc)
                else:
                    command.future.set_result(result)
                if command.name == "close":
                    return
            stopper.poll()
            now = time.monotonic()
            if state == _ACTIVE:
                if phase_stopped and (now >= edge or duty == 0):
                    stopper.resume()
                    phase_stopped = False
                    self._add_stopped(now - stopped_at, cycle=True)
                    edge = now + (1 - duty) * self.period_s
                elif not phase_stopped and duty > 0 and now >= edge and not stopper.gone:
                    try:
                        self._note_stop(stopper.stop())
                    except GuestError:
                        pass    # it exited: the statistics say so, freeze() raises
                    else:
                        phase_stopped, stopped_at = True, time.monotonic()
                        edge = stopped_at + duty * self.period_s
                elif duty == 0:
                    edge = now      # the first stop after a set() comes at once
            self._note(stopper)

    def _execute(self, stopper: GuestStopper, command: _Command):
        if command.name == "freeze":
            try:
                return self._note_stop(stopper.stop())
            finally:
                self._note(stopper)
        if command.name == "thaw":
            if not stopper.gone:
                stopper.resume()
            return None
        if command.name == "commit":
            return self._commit(stopper, *command.args)
        if command.name == "close":
            with self._cond:
                killed = self._killed
            # a killed guest is not waited for: the kernel detaches it when this thread ends
            gone = killed or stopper.detach(self._pidfd)
            if stopper.permanent and gone and self._commit_path:
                committed.discard_stale(self._commit_path, killed=self.pid if killed else None)
            self._note(stopper)
            return None
        raise AssertionError(command.name)

    def _commit(self, stopper: GuestStopper, migration: str, control: str, destination: str, layout,
                switch_round: int | None) -> committed.CommitRecord:
        if stopper.gone or not stopper.holding:
            raise GuestError(f"guest pid {self.pid} is not frozen (exited?)")
        shape = {} if layout is None else {
            "page_size": layout.page_size, "regions": tuple((r.start, r.length) for r in layout.regions)}
        record = committed.new_record(self.pid, migration, destination, switch_round=switch_round, **shape)
        staged = committed.StagedRecord(control, record)
        try:
            stopper.make_permanent(self._pidfd)
        except BaseException:
            staged.discard()
            raise
        try:
            staged.publish()
        except BaseException:
            stopper.cancel_permanent(self._pidfd)
            raise
        return staged.record

    def _note_stop(self, seconds: float) -> float:
        with self._cond:
            self._freeze_s = seconds
        return seconds

    def _add_stopped(self, seconds: float, *, cycle: bool = False) -> None:
        with self._cond:
            self._stopped_s += seconds
            self._cycles += cycle

    def _note(self, stopper: GuestStopper) -> None:
        with self._cond:
            self._threads = len(stopper.threads)
            self._forwarded = stopper.signals_forwarded
            self._exited = self._exited or stopper.gone
