"""The exit statuses of every migrator command, so that a script can tell what happened.

====  =======================================================================================
 0    done: committed (``migrate``), image written (``checkpoint``), every migration resumed
      (``receive``), report read (``report``)
 1    failed before the point of no return: the source guest runs on, nothing is lost
 2    bad input: an option value, an input file (a report, a token) or an output path,
      refused before anything ran; ``migrate --resume`` of a guest no interrupted post-copy froze
      (wrong id, not stopped by one), left as it was
 3    outcome unknown: the commit was sent but never acknowledged; the source is kept frozen
      and the destination's guest may be running (look there before resuming anything)
128+N ended by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP; see ``interrupts``)
====  =======================================================================================

Once a migration has committed, failing to write an output (``--report``, ``--plot``) is a
warning line, not a failure: the migration happened, and a script must not retry it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from ..core.errors import MigrationFailed, MigratorError, ResumeRefused

OK = 0
FAILED = 1
BAD_INPUT = 2
UNKNOWN = 3


class BadInput(Exception):
    """``error`` was raised checking a command's input, before anything ran (exit status 2)."""

    def __init__(self, error: MigratorError) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def preflight() -> Iterator[None]:
    """Checks of a command's input: a MigratorError in them is bad input (exit status 2)."""
    try:
        yield
    except MigratorError as exc:
        raise BadInput(exc) from exc


def of_failure(error: MigratorError) -> int:
    """The exit status of a command that ended with ``error``."""
    if isinstance(error, ResumeRefused):
        return BAD_INPUT
    return UNKNOWN if isinstance(error, MigrationFailed) and error.committed else FAILED


def warn(line: str) -> None:
    """One warning line on stderr: something went wrong that does not change the outcome."""
    print(f"migrator: warning: {line}", file=sys.stderr, flush=True)
