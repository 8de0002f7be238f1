"""Thin, typed wrappers over the kernel calls migrator needs. Synchronous, no trio.

Every failure raises ``OSError`` with the kernel's errno and a message naming the call and the
range it was given, e.g. ``[Errno 22] UFFDIO_REGISTER [0x7f..000, +0x100000): Invalid argument``.
All cffi calls release the GIL, so callers may run them in worker threads.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os

from ._uapi import (
    PAGEMAP_SCAN,
    PTRACE_CONT,
    PTRACE_DETACH,
    PTRACE_GETEVENTMSG,
    PTRACE_GETREGS,
    PTRACE_INTERRUPT,
    PTRACE_LISTEN,
    PTRACE_SEIZE,
    PTRACE_SETREGS,
    PTRACE_SINGLESTEP,
    SYSCALLS,
    UFFD_API,
    UFFDIO_API,
    UFFDIO_REGISTER,
    UFFDIO_UNREGISTER,
    UFFDIO_WRITEPROTECT,
    UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
    UFFDIO_WRITEPROTECT_MODE_WP,
    USERFAULTFD_IOC_NEW,
    WAIT_ALL,
    WAIT_NOTHREAD,
    ffi,
    libc,
)


def os_error(err: int, what: str) -> OSError:
    return OSError(err, f"{what}: {os.strerror(err)}")


def _span(start: int, length: int) -> str:
    return f"[{start:#x}, +{length:#x})"


def check(rc: int, what: str) -> int:
    """The one place that turns a C return code into ``OSError`` (errno read right away)."""
    if rc == -1:
        raise os_error(ffi.errno, what)
    return rc


def _ioctl(fd: int, request: int, arg, what: str) -> None:
    """ioctl with a cffi struct; the stdlib call releases the GIL and reports errno."""
    while True:
        try:
            fcntl.ioctl(fd, request, ffi.buffer(arg))
            return
        except InterruptedError:
            continue
        except OSError as exc:
            raise os_error(exc.errno, what) from None


def _syscall(name: str, *args: int, what: str | None = None) -> int:
    number = SYSCALLS.get(name)
    if number is None:
        raise os_error(_errno.ENOSYS, f"{name} (syscall number unknown on this architecture)")
    c_args = [ffi.cast("long", a) for a in args]
    while True:
        rc = libc.syscall(number, *c_args)
        if rc == -1 and ffi.errno == _errno.EINTR:
            continue
        return check(rc, what or name)


def buffer_address(buffer) -> int:
    """Address of a writable buffer (an mmap, a bytearray) without keeping it exported."""
    pointer = ffi.from_buffer(buffer)
    try:
        return int(ffi.cast("uintptr_t", pointer))
    finally:
        ffi.release(pointer)


# --- userfaultfd ----------------------------------------------------------------------------------


def userfaultfd(flags: int) -> tuple[int, str]:
    """Create a userfaultfd for the *calling* process; returns (fd, how it was reached).

    Tries the syscall first, then ``/dev/userfaultfd`` (which works where
    ``vm.unprivileged_userfaultfd=0`` denies the syscall to users who may open the device).
    """
    try:
        return _syscall("userfaultfd", flags), "syscall"
    except OSError as syscall_error:
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            raise syscall_error from None
        try:
            fd = fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        except OSError as exc:
            raise os_error(exc.errno, "USERFAULTFD_IOC_NEW on /dev/userfaultfd") from None
        finally:
            os.close(dev)
        return fd, "/dev/userfaultfd"


def uffdio_api(fd: int, features: int) -> tuple[int, int]:
    """UFFDIO_API handshake; returns (features, ioctls) the kernel granted. Once per fd."""
    arg = ffi.new("struct uffdio_api *", {"api": UFFD_API, "features": features})
    _ioctl(fd, UFFDIO_API, arg, f"UFFDIO_API features={features:#x}")
    return arg.features, arg.ioctls


def uffdio_register(fd: int, start: int, length: int, mode: int) -> int:
    """Register ``[start, start+length)`` of the uffd's process; returns the allowed ioctls."""
    arg = ffi.new("struct uffdio_register *", {"range": {"start": start, "len": length}, "mode": mode})
    _ioctl(fd, UFFDIO_REGISTER, arg, f"UFFDIO_REGISTER {_span(start, length)}")
    return arg.ioctls


def uffdio_unregister(fd: int, start: int, length: int) -> None:
    arg = ffi.new("struct uffdio_range *", {"start": start, "len": length})
    _ioctl(fd, UFFDIO_UNREGISTER, arg, f"UFFDIO_UNREGISTER {_span(start, length)}")


def uffdio_writeprotect(fd: int, start: int, length: int, protect: bool, *, wake: bool = True) -> None:
    """Write-protect (or, in synchronous mode, unprotect and wake) a range of the uffd's process."""
    mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
    if not protect and not wake:
        mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    arg = ffi.new("struct uffdio_writeprotect *", {"range": {"start": start, "len": length}, "mode": mode})
    verb = "protect" if protect else "unprotect"
    _ioctl(fd, UFFDIO_WRITEPROTECT, arg, f"UFFDIO_WRITEPROTECT ({verb}) {_span(start, length)}")


# --- PAGEMAP_SCAN ---------------------------------------------------------------------------------


_PAGEMAP_SCAN = ffi.cast("unsigned long", PAGEMAP_SCAN)


def pagemap_scan_arg(
    vec,
    vec_len: int,
    *,
    flags: int,
    category_mask: int = 0,
    category_anyof_mask: int = 0,
    category_inverted: int = 0,
    return_mask: int,
    max_pages: int = 0,
):
    """A ``struct pm_scan_arg`` for repeated ``pagemap_scan_with`` calls (built once per walk)."""
    return ffi.new(
        "struct pm_scan_arg *",
        {
            "size": ffi.sizeof("struct pm_scan_arg"),
            "flags": flags,
            "vec": int(ffi.cast("uintptr_t", vec)),
            "vec_len": vec_len,
            "max_pages": max_pages,
            "category_inverted": category_inverted,
            "category_mask": category_mask,
            "category_anyof_mask": category_anyof_mask,
            "return_mask": return_mask,
        },
    )


def pagemap_scan_with(pagemap_fd: int, arg, start: int, end: int) -> tuple[int, int]:
    """One PAGEMAP_SCAN ioctl over ``[start, end)`` with a prepared ``arg``: (regions, walk_end).

    Fills ``arg.vec``; may stop early (vec full, max_pages): callers loop, see ``tracker.scan``.
    """
    arg.start = start
    arg.end = end
    while True:
        rc = libc.ioctl(pagemap_fd, _PAGEMAP_SCAN, arg)
        if rc != -1:
            return rc, arg.walk_end
        err = ffi.errno
        if err != _errno.EINTR:
            raise os_error(err, f"PAGEMAP_SCAN {_span(start, end - start)} flags={arg.flags:#x}")


def pagemap_scan(pagemap_fd: int, start: int, end: int, vec, vec_len: int, **masks) -> tuple[int, int]:
    """One PAGEMAP_SCAN ioctl on an open ``/proc/PID/pagemap``: (regions, walk_end).

    ``vec`` is a cffi ``struct page_region[vec_len]`` (or ``ffi.NULL`` with 0); ``masks`` are the
    keyword arguments of ``pagemap_scan_arg``.
    """
    return pagemap_scan_with(pagemap_fd, pagemap_scan_arg(vec, vec_len, **masks), start, end)


# --- other processes ------------------------------------------------------------------------------


def pidfd_open(pid: int) -> int:
    return _syscall("pidfd_open", pid, 0)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate file descriptor ``target_fd`` of the process behind ``pidfd`` (needs ptrace rights)."""
    return _syscall("pidfd_getfd", pidfd, target_fd, 0)


# --- ptrace ---------------------------------------------------------------------------------------
# The kernel takes requests for a tracee only from the thread that seized it (any other thread
# gets ESRCH), so a caller keeps one thread for all of these. SEIZE and INTERRUPT work on a
# running tracee; CONT, LISTEN, DETACH and GETEVENTMSG need it in a ptrace-stop (ESRCH otherwise,
# and when it is gone).


def ptrace_seize(tid: int, options: int) -> None:
    """Trace thread ``tid`` without stopping it (PTRACE_SEIZE); ``options`` are PTRACE_O_* bits."""
    _syscall("ptrace", PTRACE_SEIZE, tid, 0, options, what=f"PTRACE_SEIZE of thread {tid}")


def ptrace_interrupt(tid: int) -> None:
    """Ask a seized thread to enter a ptrace-stop (reported by ``wait_tracee`` as PTRACE_EVENT_STOP)."""
    _syscall("ptrace", PTRACE_INTERRUPT, tid, 0, 0, what=f"PTRACE_INTERRUPT of thread {tid}")


def ptrace_cont(tid: int, sig: int = 0) -> None:
    """Resume a stopped tracee, delivering ``sig`` (0 = none): how a signal is re-injected."""
    _syscall("ptrace", PTRACE_CONT, tid, 0, sig, what=f"PTRACE_CONT of thread {tid}")


def ptrace_listen(tid: int) -> None:
    """Release a tracee in a group-stop without running it: it stays stopped like an untraced
    process would, and reports again when SIGCONT (or PTRACE_INTERRUPT) wakes it."""
    _syscall("ptrace", PTRACE_LISTEN, tid, 0, 0, what=f"PTRACE_LISTEN of thread {tid}")


def ptrace_detach(tid: int, sig: int = 0) -> None:
    """Stop tracing a stopped tracee, delivering ``sig`` (0 = none) as it resumes."""
    _syscall("ptrace", PTRACE_DETACH, tid, 0, sig, what=f"PTRACE_DETACH of thread {tid}")


def ptrace_geteventmsg(tid: int) -> int:
    """The message of the event ``tid`` is stopped at (for PTRACE_EVENT_CLONE: the new thread's id)."""
    message = ffi.new("unsigned long *")
    _syscall("ptrace", PTRACE_GETEVENTMSG, tid, 0, int(ffi.cast("uintptr_t", message)),
             what=f"PTRACE_GETEVENTMSG of thread {tid}")
    return int(message[0])


def ptrace_getregs(tid: int):
    """The general registers of a stopped tracee (x86-64 ``struct user_regs_struct``)."""
    regs = ffi.new("struct user_regs_struct *")
    _syscall("ptrace", PTRACE_GETREGS, tid, 0, int(ffi.cast("uintptr_t", regs)),
             what=f"PTRACE_GETREGS of thread {tid}")
    return regs


def ptrace_setregs(tid: int, regs) -> None:
    """Load ``regs`` (a ``struct user_regs_struct *``) into a stopped tracee."""
    _syscall("ptrace", PTRACE_SETREGS, tid, 0, int(ffi.cast("uintptr_t", regs)),
             what=f"PTRACE_SETREGS of thread {tid}")


def ptrace_singlestep(tid: int) -> None:
    """Run one instruction of a stopped tracee; it stops again with SIGTRAP."""
    _syscall("ptrace", PTRACE_SINGLESTEP, tid, 0, 0, what=f"PTRACE_SINGLESTEP of thread {tid}")


def wait_tracee(*, block: bool) -> tuple[int, int] | None:
    """The next stop or exit of a tracee of the *calling thread*: ``(tid, wait status)``, or None
    when ``block`` is False and nothing is pending; ``ChildProcessError`` when it has none left.

    ``__WNOTHREAD`` keeps it from reaping children of the process's other threads (a test's
    subprocesses, say); ``__WALL`` reports threads as well as processes.
    """
    flags = WAIT_ALL | WAIT_NOTHREAD | (0 if block else os.WNOHANG)
    tid, status = os.waitpid(-1, flags)
    return None if tid == 0 else (tid, status)
