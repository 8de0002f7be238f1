"""Watch a tracker follow a scratch process's writes (``migrator track``): a few seconds.

Spawns a scratch process with a populated region, hands its uffd to the chosen tracker, starts
random single-page writes at ``--rate`` pages/s, and prints per round the pages the tracker
reported and how long ``collect()`` took. Repeated writes to one page count once per round, so
a round reports at most the writes made in it.
"""

from __future__ import annotations

import argparse
import time

from ..tracker import TRACKERS, choose_tracker, open_tracker, required_uffd_mode
from ..tracker.scratch import ScratchProcess
from . import options

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=options.size, default=64 << 20, help="region size (default 64M)")
    parser.add_argument("--rounds", type=options.count, default=5, help="collect rounds (default 5)")
    parser.add_argument("--tracker", choices=TRACKERS, default=None, help="default: what probe recommends")
    parser.add_argument("--rate", type=options.positive, default=20000.0, help="page writes per second (default 20000)")
    parser.add_argument("--interval", type=options.positive, default=0.5, help="seconds between collects (default 0.5)")


def run(args: argparse.Namespace) -> int:
    kind = args.tracker or choose_tracker()
    mode = required_uffd_mode(kind) or "none"
    with ScratchProcess(args.size, mode, populate=True) as scratch:
        tracker = open_tracker(kind, pid=scratch.pid, regions=[scratch.region], uffd=scratch.take_uffd())
        with tracker:
            pages = sum(n for _, n in tracker.populated())
            print(f"tracker {kind}: scratch process {scratch.pid}, {args.size >> 20} MiB, "
                  f"{pages} pages populated; writing {args.rate:g} random pages/s")
            tracker.arm()
            scratch.start_writing(args.rate)
            print(f"{'round':>5} {'written':>9} {'reported':>9} {'runs':>7} {'scan ms':>8}")
            written_before = 0
            for round_no in range(1, args.rounds + 1):
                time.sleep(args.interval)
                runs = tracker.collect()
                written = scratch.written()
                stats = tracker.statistics()
                print(f"{round_no:>5} {written - written_before:>9} {stats.last_pages:>9} {len(runs):>7} "
                      f"{stats.last_scan_seconds * 1e3:>8.3f}")
                written_before = written
            scratch.stop_writing()
            stats = tracker.statistics()
            print(f"{stats.pages_reported} pages reported in {stats.collects} collects, "
                  f"{stats.scan_seconds * 1e3:.2f} ms scanning, {stats.ioctls} ioctls"
                  + (f", {stats.faults} write faults resolved" if stats.faults else ""))
    return 0
