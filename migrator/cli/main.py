"""``migrator``: a thin argparse adapter over the library.

Each subcommand lives in the package that owns the feature and contributes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. This module only wires them up, catches
``MigratorError`` once, prints ``migrator: <Type>: <message>`` on one line and exits with the
status ``exits`` documents (1 failed with the source running, 2 bad input, 3 outcome unknown).
Ctrl-C exits 130; SIGTERM and SIGHUP end a command the same way (``interrupts``) and exit 128 +
the signal's number.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..core.documents import migrator_version
from ..core.errors import MigratorError
from ..core.failures import expected_cause
from . import exits
from .interrupts import Interrupted

# name -> (module implementing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "probe": ("migrator.cli.probe", "report which kernel features and trackers work here"),
    "track": ("migrator.cli.track", "track a running process's writes (--pid), or a scratch process's (--demo)"),
    "trace": ("migrator.cli.trace", "summarise a trace recorded by track --record"),
    "predict": ("migrator.cli.predict", "predict a pre-copy migration from a trace, next to the classic model"),
    "guest": ("migrator.cli.guest", "run a guest workload whose whole state lives in its tracked memory"),
    "report": ("migrator.cli.report", "print a migration report's round table and summary; --plot draws it"),
    "migrate": ("migrator.cli.migrate", "live-migrate a running guest to a receiver"),
    "receive": ("migrator.cli.receive", "receive migrations and resume their guests"),
    "status": ("migrator.cli.status", "show how far a running migration is (from another terminal)"),
    "cancel": ("migrator.cli.cancel", "cancel a running migration before its point of no return"),
    "set": ("migrator.cli.set", "change a running migration's bandwidth, downtime target or round limit"),
    "checkpoint": ("migrator.cli.checkpoint", "write a checkpoint image of a running guest (full, incremental, continuous)"),
    "restore": ("migrator.cli.restore", "restore a guest from a checkpoint image chain and resume it"),
    "inspect": ("migrator.cli.inspect", "show (and --verify) a checkpoint image chain"),
    "experiment": ("migrator.cli.experiment", "measure pre-copy convergence over a grid of real migrations"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's module is imported (fast start-up, and
    one broken optional piece cannot take every command down)."""
    parser = argparse.ArgumentParser(
        prog="migrator", description="Live-migrate and checkpoint Linux processes (userfaultfd dirty tracking).",
        epilog="Exit status: 0 done, 1 failed before the point of no return (the source runs on), 2 bad input, "
               "3 outcome unknown (committed, unacknowledged), 128+N ended by signal N. See docs/reports.md.")
    parser.add_argument("--version", action="version", version=f"migrator {migrator_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    try:
        try:
            return int(args._run(args) or 0)
        except BaseExceptionGroup as group:   # from a trio nursery: report what is inside
            raise expected_cause(group) from None
    except exits.BadInput as exc:
        print(f"migrator: {type(exc.error).__name__}: {exc.error}", file=sys.stderr)
        return exits.BAD_INPUT
    except MigratorError as exc:
        print(f"migrator: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exits.of_failure(exc)
    except OSError as exc:
        print(f"migrator: OSError: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"migrator: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("migrator: interrupted", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())
