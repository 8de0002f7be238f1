"""Give a running process a userfaultfd without its help: one system call injected with ptrace.

A userfaultfd acts on the memory of the process that created it, whoever holds it later
(``/work/shared/kernel-abi.md``), and the tracker's own copy accepts UFFDIO_API, UFFDIO_REGISTER
and UFFDIO_WRITEPROTECT for the target's mm. So the only thing that must run *inside* the target
is ``userfaultfd(UFFD_USER_MODE_ONLY | O_CLOEXEC | O_NONBLOCK)`` (and the ``close`` of its copy
once ours is taken with ``pidfd_getfd``); no argument struct has to be written into its memory.

One thread is stopped (PTRACE_SEIZE + PTRACE_INTERRUPT: a stop that ends with its tracer, never
SIGSTOP), its registers saved, ``rip`` pointed at a ``syscall`` instruction of its vDSO with
``rax`` and the arguments set and ``orig_rax = -1`` (so the kernel does not treat the stop as an
interrupted call to restart), one PTRACE_SINGLESTEP, ``rax`` read; twice; then the saved registers
go back unchanged, so a system call the thread was blocked in restarts exactly as after any
signal, and PTRACE_DETACH lets it go. The other threads never stop.

The order keeps a tracker that dies at any moment harmless: the uffd is closed in the target
*before* the tracker calls UFFDIO_API on its copy, so nothing is ever registered on an fd the
target still holds, and a SIGKILLed tracker's copy (and with it every registration) closes with
it. Left over is a window of a few microseconds, while the injected registers are loaded, in
which a tracker killed would let the thread run on with them, as with any ptrace injector.

As when ``gdb`` or ``strace -p`` attach, a blocking call the kernel does not restart by itself
(``epoll_wait``) returns EINTR to the stopped thread once; programs retry it. The calls that
restart (``read``, ``poll``, ``futex``, ``nanosleep``...) do so unseen.

Only x86-64 is implemented (the register layout and the instruction are per architecture).
"""

from __future__ import annotations

import errno
import os
import platform
import signal
import time
from dataclasses import dataclass

from ..core.errors import TrackerError, TrackerUnavailable
from . import _sys
from ._uapi import (
    INJECT_SYSCALLS,
    PTRACE_EVENT_STOP,
    SYSCALL_INSTRUCTION,
    UFFD_USER_MODE_ONLY,
    WAIT_ALL,
    ffi,
)

_GROUP_STOP_SIGNALS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
_U64 = (1 << 64) - 1
_STEP_ATTEMPTS = 8   # a signal arriving during the step stops the thread before the instruction


@dataclass(frozen=True, slots=True)
class Injected:
    """A uffd of the target's mm, owned by the caller, and how long the target's thread stood."""

    uffd: int
    stopped_s: float
    tid: int


def status_field(pid: int, name: str) -> str | None:
    """A field of /proc/PID/status (None if the process or the field is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key == name:
                    return value.strip()
    except OSError:
        return None
    return None


def _no_such_process(pid: int) -> TrackerError:
    return TrackerError(f"no such process: {pid}")


def rights_refusal(pid: int, call: str) -> TrackerUnavailable:
    """The one line for a ptrace right that is missing, saying how to get it."""
    tracer = status_field(pid, "TracerPid")
    if tracer not in (None, "0"):
        return TrackerUnavailable(f"process {pid} is already traced (by process {tracer}); "
                                  "a thread has one tracer at a time: stop that debugger or tracer first")
    try:
        scope = open("/proc/sys/kernel/yama/ptrace_scope").read().strip()
    except OSError:
        scope = None
    yama = f"; Yama ptrace_scope is {scope}" if scope is not None else ""
    return TrackerUnavailable(
        f"{call} of process {pid} refused: tracking it needs ptrace attach rights over it "
        f"(PTRACE_MODE_ATTACH_REALCREDS){yama}. Run as the same user with Yama ptrace_scope 0 "
        "(or 1 when migrator is its parent or its PR_SET_PTRACER), or with CAP_SYS_PTRACE"
    )


def syscall_address(pid: int) -> int:
    """The address of a ``syscall`` instruction in the target's vDSO (read via /proc/PID/mem)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            vdso = [line.split()[0] for line in maps if line.rstrip().endswith("[vdso]")]
    except FileNotFoundError:
        raise _no_such_process(pid) from None
    except PermissionError:
        raise rights_refusal(pid, "reading the mappings") from None
    if not vdso:
        raise TrackerUnavailable(f"process {pid} has no vDSO to borrow a syscall instruction from")
    start, end = (int(part, 16) for part in vdso[0].split("-"))
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        raise rights_refusal(pid, "reading the memory") from None
    try:
        text = os.pread(fd, end - start, start)
    finally:
        os.close(fd)
    offset = text.find(SYSCALL_INSTRUCTION)
    if offset < 0:
        raise TrackerUnavailable(f"no syscall instruction in the vDSO of process {pid}")
    return start + offset


def choose_thread(pid: int) -> int:
    """A live thread of ``pid``: the leader unless it already exited (a zombie leader)."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise _no_such_process(pid) from None
    for tid in [pid] + [t for t in tids if t != pid]:
        state = status_field(tid, "State")
        if state is not None and not state.startswith(("Z", "X")):
            return tid
    raise _no_such_process(pid)


class _Stopped:
    """One seized thread in a ptrace-stop; restores its registers and detaches on exit."""

    def __init__(self, pid: int, tid: int) -> None:
        self.pid, self.tid = pid, tid
        self.saved = None
        self.pending: list[int] = []   # signals that arrived meanwhile, delivered at detach

    def __enter__(self) -> _Stopped:
        try:
            _sys.ptrace_seize(self.tid, 0)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise _no_such_process(self.pid) from None
            if exc.errno == errno.EPERM:
                raise rights_refusal(self.pid, "PTRACE_SEIZE") from None
            raise
        try:
            self.started = time.monotonic()
            _sys.ptrace_interrupt(self.tid)
            self._wait_for_interrupt()
            self.saved = _sys.ptrace_getregs(self.tid)
        except BaseException:
            self._detach()
            raise
        return self

    def _wait(self) -> int:
        _tid, status = os.waitpid(self.tid, WAIT_ALL)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise TrackerError(f"process {self.pid} exited while migrator attached")
        return status

    def _wait_for_interrupt(self) -> None:
        while True:
            status = self._wait()
            sig = os.WSTOPSIG(status)
            if status >> 16 == PTRACE_EVENT_STOP:
                if sig in _GROUP_STOP_SIGNALS:
                    raise TrackerUnavailable(f"process {self.pid} is stopped (signal {signal.Signals(sig).name}); "
                                             "continue it (SIGCONT) before tracking it")
                return
            # A signal-delivery-stop came first: pass the signal on, the interrupt stop follows.
            _sys.ptrace_cont(self.tid, sig)

    def syscall(self, address: int, number: int, *args: int) -> int:
        """Run ``number(*args)`` in the stopped thread at the ``syscall`` at ``address``."""
        regs = ffi.new("struct user_regs_struct *")
        ffi.memmove(regs, self.saved, ffi.sizeof("struct user_regs_struct"))
        regs.rax, regs.orig_rax, regs.rip = number, _U64, address
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, name, value & _U64)
        _sys.ptrace_setregs(self.tid, regs)
        for _ in range(_STEP_ATTEMPTS):
            _sys.ptrace_singlestep(self.tid)
            status = self._wait()
            sig = os.WSTOPSIG(status)
            after = _sys.ptrace_getregs(self.tid)
            if after.rip == address + len(SYSCALL_INSTRUCTION):
                if sig != signal.SIGTRAP:
                    self.pending.append(sig)
                result = after.rax
                return result - (1 << 64) if result >> 63 else result
            if sig != signal.SIGTRAP and status >> 16 == 0:
                self.pending.append(sig)   # stopped for a signal before the instruction ran
        raise TrackerError(f"the injected system call in thread {self.tid} did not complete")

    def _detach(self) -> None:
        try:
            if self.saved is not None:
                _sys.ptrace_setregs(self.tid, self.saved)
            _sys.ptrace_detach(self.tid, self.pending.pop(0) if self.pending else 0)
        except OSError as exc:
            if exc.errno != errno.ESRCH:   # ESRCH: it died meanwhile; nothing left to restore
                raise
        for sig in self.pending:
            os.kill(self.pid, sig)
        self.stopped_s = time.monotonic() - self.started

    def __exit__(self, *exc) -> None:
        self._detach()


def inject_userfaultfd(pid: int) -> Injected:
    """A userfaultfd created inside ``pid`` and moved to us; the target keeps no copy of it.

    The fd has had no UFFDIO_API yet (the caller chooses the features). Raises TrackerError (no
    such process, it exited meanwhile) or TrackerUnavailable (rights, already traced, a kernel
    or architecture that cannot do it), each one line.
    """
    if platform.machine() != "x86_64":
        raise TrackerUnavailable(f"attaching to a running process is implemented for x86-64 only, not {platform.machine()}")
    if not os.path.isdir(f"/proc/{pid}") or status_field(pid, "Tgid") != str(pid):
        raise _no_such_process(pid)
    try:
        pidfd = _sys.pidfd_open(pid)
    except OSError as exc:
        raise _no_such_process(pid) if exc.errno == errno.ESRCH else exc from None
    try:
        tid = choose_thread(pid)
        address = syscall_address(pid)
        with _Stopped(pid, tid) as stopped:
            flags = UFFD_USER_MODE_ONLY | os.O_CLOEXEC | os.O_NONBLOCK
            target_fd = stopped.syscall(address, INJECT_SYSCALLS["userfaultfd"], flags)
            if target_fd < 0:
                raise TrackerUnavailable(
                    f"userfaultfd() inside process {pid} failed: {os.strerror(-target_fd)} "
                    "(needs CONFIG_USERFAULTFD; UFFD_USER_MODE_ONLY is allowed to any user)"
                )
            try:
                uffd = _sys.pidfd_getfd(pidfd, target_fd)
            except OSError as exc:
                stopped.syscall(address, INJECT_SYSCALLS["close"], target_fd)
                if exc.errno == errno.EPERM:
                    raise rights_refusal(pid, "pidfd_getfd") from None
                raise
            closed = stopped.syscall(address, INJECT_SYSCALLS["close"], target_fd)
            if closed < 0:
                os.close(uffd)
                raise TrackerError(f"close({target_fd}) inside process {pid} failed: {os.strerror(-closed)}")
    finally:
        os.close(pidfd)
    return Injected(uffd=uffd, stopped_s=stopped.stopped_s, tid=tid)
