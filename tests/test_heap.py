"""A long-running server gives back what its worker threads allocated for a session.

Each case runs in a fresh interpreter, so its malloc state is its own: a worker thread fills
and frees megabytes the way the receivers' decompression threads do (after a large free has
raised glibc's dynamic mmap threshold, so they come from an arena, not from mmap), then the
process trims. Without ``use_main_arena_only`` the thread's arena keeps its top resident.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MiB = 1 << 20

SESSION = r"""
import json, sys, threading
from migrator.core import heap

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

if sys.argv[1] == "main-arena":
    heap.use_main_arena_only()
big = bytearray(16 << 20)     # freed, a large mmapped block makes glibc raise its thresholds:
del big                       # mmap past 16 MiB, trimming a heap's top past 32 MiB
before = rss()

def session():
    held = [bytearray(b"p" * (256 << 10)) for _ in range(32)]   # 8 MiB of page contents
    del held

worker = threading.Thread(target=session)
worker.start()
worker.join()
heap.release_free_memory()
print(json.dumps({"kept": rss() - before}))
"""


def kept_after_session(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SESSION, mode], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)["kept"]


def test_a_worker_threads_session_is_given_back_with_one_arena():
    kept = kept_after_session("main-arena")
    assert kept < 2 * MiB, f"{kept / MiB:.1f} MiB of an 8 MiB session stayed resident"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc arenas (Linux)")
def test_without_it_a_thread_arena_keeps_the_session():
    """The case the module exists for: if this ever stops holding, glibc trims thread arenas
    itself and ``use_main_arena_only`` may go."""
    assert kept_after_session("thread-arena") > 6 * MiB


COLLECTOR = r"""
import gc, json, time
from migrator.core import heap
import migrator.cli.main, migrator.source.migration, migrator.destination.engine   # a command's startup

def full_collection_ms():
    t = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t) * 1000

before = min(full_collection_ms() for _ in range(3))
heap.settle_heap()
frozen = gc.get_freeze_count()
after = min(full_collection_ms() for _ in range(3))
states = []
with heap.collector_paused():
    states.append(gc.isenabled())
    with heap.collector_paused():
        states.append(gc.isenabled())
    states.append(gc.isenabled())
states.append(gc.isenabled())
gc.disable()
with heap.collector_paused():
    pass
states.append(gc.isenabled())
print(json.dumps({"before": before, "after": after, "frozen": frozen, "states": states}))
"""


def test_a_settled_heap_keeps_full_collections_short_and_the_downtime_pauses_the_collector():
    out = subprocess.run([sys.executable, "-c", COLLECTOR], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["frozen"] > 10_000, "the startup's objects are out of the collector's reach"
    assert result["after"] < result["before"] / 5, result
    # off inside (nested too), back on after; a collector that was off stays off
    assert result["states"] == [False, False, False, True, False]
