"""ptrace, as far as a stop that ends with its tracer needs it: the public face of the calls in
``_sys`` and the constants in ``_uapi`` for ``migrator.source.freeze``.

Every request for a tracee must come from the thread that seized it; see ``_sys`` for what each
call needs and raises (``OSError`` with the kernel's errno, naming the call and the thread).
"""

from __future__ import annotations

from ._sys import (
    ptrace_cont,
    ptrace_detach,
    ptrace_geteventmsg,
    ptrace_interrupt,
    ptrace_listen,
    ptrace_seize,
    wait_tracee,
)
from ._uapi import PTRACE_EVENT_CLONE, PTRACE_EVENT_STOP, PTRACE_O_TRACECLONE

__all__ = [
    "PTRACE_EVENT_CLONE",
    "PTRACE_EVENT_STOP",
    "PTRACE_O_TRACECLONE",
    "ptrace_cont",
    "ptrace_detach",
    "ptrace_geteventmsg",
    "ptrace_interrupt",
    "ptrace_listen",
    "ptrace_seize",
    "wait_tracee",
]
