"""The process's heap: memory handed back to the kernel, and the cyclic collector kept out of
the downtime.

A full collection walks every object the process holds and stops every thread meanwhile: about
6 ms with migrator's modules loaded, on this VM, which a 10 ms downtime cannot absorb. So the
commands move what their startup made out of the collector's reach (``settle_heap``: later full
collections walk only what the migration made), and the cyclic collector is off from the freeze
to the resume (``collector_paused``).

Memory handed back to the kernel, for a long-running receiver:

A session receives and decompresses its pages through buffers of megabytes. glibc's malloc
serves them from the heap once its dynamic mmap threshold has risen past their size, and freed
heap memory stays resident unless something trims it. ``malloc_trim(0)`` returns every whole
free page of the main arena, wherever it lies, but of a thread's arena only the free chunks in
its bins, never the free space at its top: the worker threads that decompress pages each left
their arena's top, megabytes of old page contents, resident after every session. So a server
keeps every thread on the main arena (``use_main_arena_only``, before its first worker thread)
and trims after each session (``release_free_memory``); the next session faults in what it
needs again.
"""

from __future__ import annotations

import ctypes
import gc
from contextlib import contextmanager

_M_ARENA_MAX = -8      # mallopt's parameter number, from glibc's <malloc.h>

try:
    _libc = ctypes.CDLL(None)
    _malloc_trim, _mallopt = _libc.malloc_trim, _libc.mallopt
except (OSError, AttributeError):   # not glibc: nothing to tune or trim this way
    _malloc_trim = _mallopt = None


def use_main_arena_only() -> None:
    """Make threads that have no malloc arena yet share the main one, which ``release_free_memory``
    can trim completely (glibc; elsewhere a no-op). Threads that already have an arena keep it."""
    if _mallopt is not None:
        _mallopt(_M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Give the kernel back the heap memory this process has freed (glibc; elsewhere only the
    collection). The collection first: a session's reference cycles (a failure's traceback, its
    tasks) may hold its buffers until the collector would run, after the trim."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def settle_heap() -> None:
    """Collect once, then freeze what is alive (modules, classes, settings: the command's
    startup) into the collector's permanent generation. For a command's process only: a library
    user's objects would be frozen too."""
    gc.collect()
    gc.freeze()


@contextmanager
def collector_paused():
    """The cyclic collector off inside the block (a downtime), as it was before after it.
    Reference counting still frees everything that is not in a cycle."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
