"""Stop a guest with ptrace: a stop that ends with whoever holds it, however that one dies.

A SIGSTOP outlives the process that sent it: a migrator killed while its guest was stopped left
the guest in state T for good, while the destination, which discards its copy when the stream
breaks, held no running copy either. A ptrace stop belongs to its tracer: when the tracer exits,
the kernel detaches every tracee and they run on. So each thread of the guest is seized
(``PTRACE_SEIZE``, which does not stop it, with ``PTRACE_O_TRACECLONE`` so that threads born later
are attached by the kernel) and stopped with ``PTRACE_INTERRUPT``. A stop is confirmed when
``waitpid`` has reported one for every thread, not by sampling /proc.

Being a tracer brings duties, all kept here:

- Only the thread that seized may make requests, so a ``GuestStopper`` is used by one thread
  (the one that created it: ``Throttle``'s daemon thread).
- While the guest runs, its every ptrace-stop (a signal arriving, a clone, a new thread's first
  stop) waits for us: ``poll`` handles them and lets the thread go on.
- A signal the guest receives shows as a signal-delivery-stop; it is re-injected when the thread
  resumes (``PTRACE_CONT`` with it, or ``PTRACE_DETACH`` with it), never swallowed.
- A group-stop (someone SIGSTOPs the guest) stays a stop: such threads are released with
  ``PTRACE_LISTEN`` rather than continued, and a detach leaves them stopped.
- ``make_permanent`` is for the point of no return: a SIGSTOP queued while every thread is held.
  Nothing dequeues it while they are held; when the tracer lets go (``detach`` or its death) the
  guest takes it and enters a group-stop that needs nobody.

Waiting uses ``__WNOTHREAD``, so the stopper never reaps children of the process's other threads.
The converse the kernel does not allow: when the guest is a child of the tracing *process* (a test
harness), the parent's ``waitpid``/``Popen.poll`` also sees (and consumes) the guest's
ptrace-stops, so such a parent must not wait for it while it is traced (read /proc, or poll a
pidfd); and a guest that dies while traced is reaped by the stopper, which comes first.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

from ..core.errors import GuestError
from ..tracker.ptrace import (
    PTRACE_EVENT_CLONE,
    PTRACE_EVENT_STOP,
    PTRACE_O_TRACECLONE,
    ptrace_cont,
    ptrace_detach,
    ptrace_geteventmsg,
    ptrace_interrupt,
    ptrace_listen,
    ptrace_seize,
    wait_tracee,
)

RUNNING = "running"        # resumed by us (or never stopped): may report a stop at any time
HELD = "held"              # in a ptrace-stop we keep (interrupt, clone event, a new thread's first stop)
SIGNALLED = "signalled"    # in a signal-delivery-stop, holding the signal to re-inject
GROUP_STOPPED = "group"    # in a ptrace-stop inside a group-stop someone else started
LISTENING = "listening"    # group-stopped and released with PTRACE_LISTEN: stopped, not held

_STOPPED = (HELD, SIGNALLED, GROUP_STOPPED)
_AWAITED = (RUNNING, LISTENING)
_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_SIGSTOP_BIT = 1 << (signal.SIGSTOP - 1)
RIGHTS = ("ptrace-attach rights over it: the same user with Yama ptrace_scope 0, or its parent "
          "under scope 1, or CAP_SYS_PTRACE (what process_vm_readv needs too)")


@dataclass
class _Thread:
    state: str
    signal: int = 0     # the signal a SIGNALLED thread holds


class GuestStopper:
    """Every ptrace call for guest ``pid``. Use it from the thread that created it, only."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.threads: dict[int, _Thread] = {}
        self.holding = False
        self.permanent = False
        self.signals_forwarded = 0
        self._tracer_tid = threading.get_native_id()
        self._seize_all()

    @property
    def gone(self) -> bool:
        """Every thread of the guest has exited (or been reaped)."""
        return not self.threads

    # --- the four moves ------------------------------------------------------------------------

    def poll(self) -> None:
        """Handle every pending stop and exit without blocking, resuming what we do not hold."""
        while (event := self._next(block=False)) is not None:
            self._handle(*event)

    def stop(self) -> float:
        """Hold every thread in a ptrace-stop. Returns the seconds from the first PTRACE_INTERRUPT
        to the last stop reported by waitpid; GuestError when the guest has exited."""
        self.holding = True
        self.poll()     # exits and stops already reported (a guest killed while held, say)
        started = time.perf_counter()
        held = [tid for tid, thread in self.threads.items() if thread.state not in _AWAITED]
        for tid, thread in list(self.threads.items()):
            if thread.state in _AWAITED:
                try:
                    ptrace_interrupt(tid)
                except ProcessLookupError:
                    del self.threads[tid]   # reaped already: nothing will report
        self._forget_zombie_leader()
        while any(t.state in _AWAITED for t in self.threads.values()):
            event = self._next(block=True)
            if event is None:
                break
            self._handle(*event)
        # a thread held since before this call may have been killed there: it has left its stop
        # (a held thread leaves it only so) and its exit is still to come; wait for that rather
        # than count it held (seen: the leader gone, a thread running its exit)
        for tid in held:
            state = _thread_state(self.pid, tid) if tid in self.threads else "t"
            if state is None:
                del self.threads[tid]          # reaped already: nothing will report
            elif state not in ("t", "T"):
                self.threads[tid].state = RUNNING
        while any(t.state in _AWAITED for t in self.threads.values()):
            event = self._next(block=True)
            if event is None:
                break
            self._handle(*event)
        elapsed = time.perf_counter() - started
        if self.gone:
            raise GuestError(f"guest pid {self.pid} exited")
        return elapsed

    def resume(self) -> None:
        """Let every held thread go on: continued, with the signal it holds, or listening if it
        is in someone's group-stop. Refused after ``make_permanent``."""
        if self.permanent:
            raise GuestError(f"guest pid {self.pid} is stopped for good (committed): it must not resume")
        self.holding = False
        for tid, thread in list(self.threads.items()):
            if thread.state in _STOPPED:
                self._release(tid, thread)

    def make_permanent(self, pidfd: int) -> None:
        """Queue a SIGSTOP behind the ptrace stop (every thread must be held): from now on losing
        the tracer leaves the guest stopped. ``cancel_permanent`` undoes it before it is relied on."""
        if not self.holding or any(t.state not in _STOPPED for t in self.threads.values()):
            raise RuntimeError(f"guest pid {self.pid} is not frozen")
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
        except ProcessLookupError:
            raise GuestError(f"guest pid {self.pid} exited") from None
        if not self._stop_pending():
            raise GuestError(f"guest pid {self.pid}: the SIGSTOP that makes its stop permanent is not pending")
        self.permanent = True

    def cancel_permanent(self, pidfd: int) -> None:
        """Take the queued SIGSTOP back (a SIGCONT discards it; the SIGCONT itself is delivered,
        harmlessly, when the guest resumes)."""
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGCONT)
        except ProcessLookupError:
            pass
        self.permanent = False

    def detach(self, pidfd: int) -> bool:
        """Let go of every thread, each with the signal it holds, so that nothing is traced when
        this returns. Group-stopped threads stay stopped; after ``make_permanent`` the whole guest
        stops for good. Returns True when the guest is gone (killed while we held it, say)."""
        if self.gone:
            return True
        try:
            self.stop()   # a thread must be in a ptrace-stop to be detached
        except GuestError:
            return True
        if self.permanent and not self._stop_pending():
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGSTOP)   # someone's SIGCONT discarded it
            except ProcessLookupError:
                pass
        detached = dying = 0
        for tid, thread in list(self.threads.items()):
            try:
                ptrace_detach(tid, thread.signal if thread.state == SIGNALLED else 0)
            except ProcessLookupError:
                dying += 1      # SIGKILL takes a tracee out of its stop: its exit comes next
                continue
            detached += 1
            if thread.signal:
                self.signals_forwarded += 1
            del self.threads[tid]
        while dying and (event := self._next(block=True)) is not None:
            self._handle(*event)    # only exits are left to report
        return detached == 0

    # --- attaching -----------------------------------------------------------------------------

    def _seize_all(self) -> None:
        """Seize every thread, listing /proc/PID/task again until no untraced one is left (a
        thread seized later clones traced threads only)."""
        tracer = tracer_of(self.pid)
        if tracer:
            raise GuestError(already_traced(self.pid, tracer))
        ended: set[int] = set()
        while True:
            new = [tid for tid in _thread_ids(self.pid) if tid not in self.threads and tid not in ended]
            if not new:
                break
            for tid in new:
                try:
                    ptrace_seize(tid, PTRACE_O_TRACECLONE)
                except ProcessLookupError:
                    ended.add(tid)      # ended meanwhile
                    continue
                except PermissionError as exc:
                    tracer = tracer_of(tid)
                    if tracer != self._tracer_tid and _thread_state(self.pid, tid) in ("Z", "X", None):
                        ended.add(tid)  # a zombie (a leader that exited before its threads)
                        continue
                    if tracer != self._tracer_tid:  # ours when a seized thread cloned it just now
                        raise GuestError(already_traced(self.pid, tracer) if tracer else
                                         f"cannot freeze guest pid {self.pid}: {exc.strerror}; it needs {RIGHTS}"
                                         + yama_note()) from None
                self.threads[tid] = _Thread(RUNNING)
        if self.gone:
            raise GuestError(f"cannot freeze guest pid {self.pid}: no such process")

    # --- events --------------------------------------------------------------------------------

    def _next(self, *, block: bool) -> tuple[int, int] | None:
        try:
            return wait_tracee(block=block)
        except ChildProcessError:
            self.threads.clear()    # no tracee left: all exited, and reaped (by us or the parent)
            return None

    def _handle(self, tid: int, status: int) -> None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.threads.pop(tid, None)
            return
        if not os.WIFSTOPPED(status):
            return
        sig, event = os.WSTOPSIG(status), status >> 16
        # a new thread's first stop may come before its parent's clone event names it
        thread = self.threads.setdefault(tid, _Thread(RUNNING))
        if event == PTRACE_EVENT_STOP:
            thread.state = GROUP_STOPPED if sig in _STOP_SIGNALS else HELD
        elif event == PTRACE_EVENT_CLONE:
            thread.state = HELD
            try:
                child = ptrace_geteventmsg(tid)
            except ProcessLookupError:
                child = 0
            # unless it has come and gone already (reported and reaped: /proc no longer lists it)
            if child and os.path.exists(f"/proc/{self.pid}/task/{child}"):
                self.threads.setdefault(child, _Thread(RUNNING))
        elif event == 0:
            thread.state, thread.signal = SIGNALLED, sig
        else:
            thread.state = HELD     # an event we did not ask for: nothing to forward
        if not self.holding:
            self._release(tid, thread)

    def _release(self, tid: int, thread: _Thread) -> None:
        try:
            if thread.state == GROUP_STOPPED:
                ptrace_listen(tid)
                thread.state = LISTENING
                return
            ptrace_cont(tid, thread.signal)
            if thread.signal:
                self.signals_forwarded += 1
        except ProcessLookupError:
            pass    # killed meanwhile: its exit is reported next
        thread.state, thread.signal = RUNNING, 0

    def _forget_zombie_leader(self) -> None:
        """A leader that exited before its threads never stops, and is not reported until they
        are gone: do not wait for it."""
        leader = self.threads.get(self.pid)
        if leader is not None and leader.state in _AWAITED and len(self.threads) > 1:
            if _thread_state(self.pid, self.pid) in ("Z", "X", None):
                del self.threads[self.pid]

    def _stop_pending(self) -> bool:
        pending = _status_field(self.pid, "ShdPnd")
        return pending is not None and bool(int(pending, 16) & _SIGSTOP_BIT)


def tracer_of(tid: int) -> int:
    """``TracerPid`` of a process or thread (0: not traced, or gone)."""
    value = _status_field(tid, "TracerPid")
    return int(value) if value else 0


def already_traced(pid: int, tracer: int) -> str:
    try:
        with open(f"/proc/{tracer}/comm") as f:
            name = f" ({f.read().strip()})"
    except OSError:
        name = ""
    return f"cannot freeze guest pid {pid}: it is already traced by pid {tracer}{name}; a debugger must let go first"


def thread_states(pid: int) -> set[str]:
    """The /proc state letters of ``pid``'s threads (``T``: stopped by a signal, ``t``: by a
    tracer); empty when it is gone."""
    return {state for tid in _thread_ids(pid) if (state := _thread_state(pid, tid)) is not None}


def yama_note() -> str:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return f" (Yama ptrace_scope is {f.read().strip()} here)"
    except OSError:
        return ""


def _thread_ids(pid: int) -> list[int]:
    try:
        return [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def _thread_state(pid: int, tid: int) -> str | None:
    """The thread's state letter, None once it is gone (reaped before the open, or between the
    open and the read: ESRCH)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return chr(data[data.rindex(b")") + 2])


def _status_field(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None
