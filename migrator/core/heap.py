"""Handing memory the process has freed back to the kernel, for a long-running receiver.

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
