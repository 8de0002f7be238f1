"""Watch a process's writes (``migrator track``).

``--pid PID``: attach to a running process that knows nothing of migrator (a userfaultfd
injected with ptrace, WP_ASYNC + PAGEMAP_SCAN; see ``migrator.tracker.target``), print one line
per interval, and on the way out write ``--json`` (``dirty_rate``, ``wss_pages``,
``stopped_ms``, ``untracked``, ``intervals``), ``--record`` (a trace file, docs/trace-format.md)
and ``--plot``. Whether it ends by ``--duration``, Ctrl-C, SIGTERM or the target's exit, the
target runs on, and the outputs hold the intervals so far.

``--demo`` (the default without ``--pid``): spawn a scratch process with a populated region, hand
its uffd to the chosen tracker, start random single-page writes at ``--rate`` pages/s, and print
per round the pages the tracker reported and how long ``collect()`` took. Repeated writes to one
page count once per round, so a round reports at most the writes made in it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from ..core.errors import OutputError
from ..core.files import check_output, write_file
from ..core.runs import count_pages
from ..tracker import TRACKERS, choose_tracker, open_tracker, required_uffd_mode
from ..tracker.scratch import ScratchProcess
from . import interrupts, options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=options.size, default=64 << 20, help="region size (default 64M)")
    parser.add_argument("--rounds", type=options.count, default=5, help="collect rounds (default 5)")
    parser.add_argument("--tracker", choices=TRACKERS, default=None, help="default: what probe recommends")
    parser.add_argument("--rate", type=options.positive, default=20000.0, help="page writes per second (default 20000)")
    parser.add_argument("--interval", type=options.positive, default=None,
                        help="seconds between collects (default 1, --demo 0.5)")
    target = parser.add_argument_group("a running process (--pid)")
    target.add_argument("--pid", type=options.count, default=None, help="track this running process")
    target.add_argument("--demo", action="store_true", help="watch a scratch process instead (the default without --pid)")
    target.add_argument("--duration", type=options.positive, default=None, help="stop after this many seconds (default: until Ctrl-C or the target exits)")
    target.add_argument("--json", metavar="F|-", default=None, help="write the summary as JSON to F, or stdout with -")
    target.add_argument("--record", metavar="TRACE", default=None, help="write a trace file (msgpack + zstd)")
    target.add_argument("--plot", metavar="PNG", default=None, help="plot dirty pages per interval and the working set")


def run(args: argparse.Namespace) -> int:
    if args.pid is not None:
        if args.demo:
            raise OutputError("--pid and --demo exclude each other")
        return run_pid(args)
    if args.json or args.record or args.plot or args.duration:
        raise OutputError("--json, --record, --plot and --duration need --pid")
    return run_demo(args)


def _check_outputs(args: argparse.Namespace) -> None:
    named = [(flag, path) for flag, path in (("--json", args.json), ("--record", args.record), ("--plot", args.plot))
             if path is not None and path != "-"]
    for flag, path in named:
        check_output(path)
    for i, (flag, path) in enumerate(named):
        for other, again in named[i + 1:]:
            if again == path:
                raise OutputError(f"{flag} and {other} both name {path}")


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(4096).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def run_pid(args: argparse.Namespace) -> int:
    from ..trace.model import TraceMapping, TraceRecorder, UntrackedMapping, interval_pages
    from ..trace.summary import live_line, untracked_lines
    from ..tracker.target import attach

    _check_outputs(args)
    if args.plot:
        import matplotlib  # noqa: F401 - refuse before attaching, not after the run
    interval_s = args.interval or 1.0
    state: dict = {}

    async def track() -> None:
        import trio

        tracker = attach(args.pid)
        state["tracker"] = tracker
        untracked = [UntrackedMapping(u.start, u.end, u.path, u.reason) for u in tracker.untracked.values()]
        recorder = TraceRecorder(page_size=tracker.page_size, pid=args.pid, command=_command_line(args.pid),
                                 interval_s=interval_s, stopped_ms=tracker.stopped_s * 1e3, untracked=untracked)
        state["recorder"] = recorder
        tracked_pages = sum(m.end - m.start for m in tracker.mappings) // tracker.page_size
        out = sys.stderr if args.json == "-" else sys.stdout
        print(f"attached to process {args.pid}: stopped {tracker.stopped_s * 1e3:.3f} ms; "
              f"{len(tracker.mappings)} mappings tracked ({tracked_pages} pages), {len(untracked)} untracked",
              file=out, flush=True)
        for line in untracked_lines(recorder.trace()):
            print(line, file=out)
        seen: set[int] = set()
        tick = trio.current_time()
        end = math.inf if args.duration is None else tick + args.duration
        while end - tick > 1e-6:
            tick = min(tick + interval_s, end)
            await trio.sleep_until(tick)
            if not tracker.alive():
                print(f"process {args.pid} exited", file=out)
                break
            try:
                interval = tracker.collect()
            except OSError:
                if tracker.alive():
                    raise
                print(f"process {args.pid} exited", file=out)
                break
            recorder.add_untracked(UntrackedMapping(u.start, u.end, u.path, u.reason) for u in tracker.untracked.values())
            done = recorder.add(interval.t, interval.seconds,
                                [TraceMapping(m.start, m.end, m.path) for m in tracker.mappings],
                                [(TraceMapping(m.start, m.end, m.path), runs) for m, runs in interval.written.items()])
            seen |= interval_pages(done, tracker.page_size)
            print(live_line(recorder.mappings, tracker.page_size, done, len(seen)), file=out, flush=True)

    try:
        interrupts.run(track)
    finally:
        tracker = state.get("tracker")
        if tracker is not None:
            tracker.close()
        recorder = state.get("recorder")
        if recorder is not None:
            _write_outputs(args, recorder.trace())
    return 0


def _write_outputs(args: argparse.Namespace, trace) -> None:
    from ..trace.file import write_trace
    from ..trace.summary import summarize

    summary = summarize(trace)
    if args.json == "-":
        print(json.dumps(summary, indent=1))
    elif args.json:
        write_file(args.json, json.dumps(summary, indent=1))
    if args.record:
        write_trace(args.record, trace)
    if args.plot:
        from ..trace.plot import plot_trace

        plot_trace(trace, args.plot)
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{len(trace.intervals)} intervals: dirty rate {summary['dirty_rate']:.1f} pages/s "
          f"({summary['dirty_mb_s']:.2f} MB/s), working set {summary['wss_pages']} pages, "
          f"stopped {summary['stopped_ms']:.3f} ms", file=out)


def run_demo(args: argparse.Namespace) -> int:
    args.interval = args.interval or 0.5
    kind = args.tracker or choose_tracker()
    mode = required_uffd_mode(kind) or "none"
    with ScratchProcess(args.size, mode, populate=True) as scratch:
        tracker = open_tracker(kind, pid=scratch.pid, regions=[scratch.region], uffd=scratch.take_uffd())
        with tracker:
            pages = count_pages(tracker.populated())
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
