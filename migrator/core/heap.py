"""Handing memory the process has freed back to the kernel, for a long-running receiver.

A session receives its pages through buffers of megabytes. glibc's malloc serves the first ones
with mmap, then raises its mmap threshold, and serves later ones from the heap; freed heap
memory goes back to the kernel only from the heap's top. Anything allocated above a session's
buffers meanwhile (a flood of connections, say) kept them resident after the session ended:
a receiver's RSS stayed up to a third above its idle level. ``malloc_trim(0)`` returns every
whole free page of every arena, wherever it lies; the next session faults in what it needs again.
"""

from __future__ import annotations

import ctypes

try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):   # not glibc: nothing to trim this way
    _malloc_trim = None


def release_free_memory() -> None:
    """Give the kernel back the heap memory this process has freed (glibc; elsewhere a no-op)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
