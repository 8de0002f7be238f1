"""Run a guest: a process whose whole state lives in one memory region it writes at a set rate.

The region holds a control block (settings, PRNG key, step counter), a version table and data
pages that each carry their index and the step that wrote them, so a copy of the region continues
elsewhere exactly as the original would. Control it through the unix socket given by --control
(protocol: docs/guest-protocol.md). With --replay TRACE the writes follow a trace that
``migrator track --record`` wrote: its mappings laid onto the region, its timing, looping. Tracking needs userfaultfd (WP_ASYNC, Linux 6.7+); without it
the guest still runs and says why on stderr.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from ..core.errors import GuestError
from ..guest.layout import Pattern, Settings
from ..guest.replay import load_plan
from . import options
from ..guest.server import GuestConfig, run_guest

_SETTING_OPTIONS = ("dirty_rate", "pattern", "fill", "seed", "replay")
_REPLAY_EXCLUDES = ("dirty_rate", "pattern")   # a replay's trace says which pages, and when


def _rate(text: str) -> float | None:
    if text.lower() == "unlimited":
        return None
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0 < rate < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected page writes per second (> 0) or 'unlimited'")
    return rate


def _pattern(text: str) -> Pattern:
    try:
        return Pattern.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seed(text: str) -> int:
    try:
        seed = int(text, 0)
    except ValueError:
        seed = -1
    if not 0 <= seed < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer in [0, 2**64)")
    return seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=options.guest_size,
                        help="region size, e.g. 256M or 1G (required unless --replay: then the "
                             "smallest region that holds the trace's mappings)")
    parser.add_argument("--dirty-rate", type=_rate, metavar="PAGES_PER_S|unlimited",
                        help="page writes per second (default: unlimited)")
    parser.add_argument("--pattern", type=_pattern, metavar="uniform|hot:FRACTION:SHARE|sequential",
                        help="which pages the writes go to (default: uniform); hot:0.05:0.9 sends "
                             "90%% of writes to 5%% of the pages")
    parser.add_argument("--replay", metavar="TRACE",
                        help="write what a trace (migrator track --record) shows written, with its "
                             "timing, looping at its end (instead of --pattern and --dirty-rate)")
    parser.add_argument("--fill", choices=("random", "text", "sparse"),
                        help="what the pages hold: random bytes, text-like data, or mostly zeros "
                             "(default: random)")
    parser.add_argument("--seed", type=_seed, help="workload seed (default: 1)")
    parser.add_argument("--control", metavar="SOCKET",
                        help="control socket path (default: migrator-guest-PID.sock in the temp dir)")
    parser.add_argument("--memfd", action="store_true",
                        help="back the region with a shared memfd (handed out by attach)")
    parser.add_argument("--restore", action="store_true",
                        help="map an empty region and wait for its pages; 'resume' continues the "
                             "workload from the state in the region (settings come from there too)")
    parser.add_argument("--paused", action="store_true",
                        help="fill the region, then wait for 'resume' before writing")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when the parent process exits (for test harnesses)")


def run(args: argparse.Namespace) -> int:
    given = [name for name in _SETTING_OPTIONS if getattr(args, name) is not None]
    if args.restore and given:
        option = "--" + given[0].replace("_", "-")
        raise GuestError(f"{option} cannot be used with --restore: "
                         "a restore guest takes its settings from the region it receives")
    clash = [name for name in _REPLAY_EXCLUDES if getattr(args, name) is not None]
    if args.replay is not None and clash:
        raise GuestError(f"--{clash[0].replace('_', '-')} cannot be used with --replay: the trace says "
                         "which pages are written and when")
    plan = load_plan(args.replay) if args.replay is not None else None
    size = args.size
    if plan is not None:
        size = plan.geometry(size).size
    elif size is None:
        raise GuestError("--size is required (unless --replay gives a trace to size the region by)")
    settings = Settings(
        pattern=args.pattern or Pattern(),
        fill=args.fill or "random",
        seed=1 if args.seed is None else args.seed,
        dirty_rate=args.dirty_rate,
        replay=plan,
    )
    control = args.control or os.path.join(tempfile.gettempdir(), f"migrator-guest-{os.getpid()}.sock")
    config = GuestConfig(size=size, control=control, settings=settings, memfd=args.memfd,
                         restore=args.restore, paused=args.paused,
                         exit_with_parent=args.exit_with_parent)
    return run_guest(config)
