"""One line for the user from whatever ended a task: an error, or the exception group a trio
nursery raises around it.

Engines put that line in their reports and Abort frames, the receiver in its log, the command
line on stderr: all of them read it from here, so a failure reads the same everywhere.
"""

from __future__ import annotations

import trio

from .errors import MigratorError


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, as trio nurseries raise them, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_exceptions(inner)]
    return [exc]


def first_cause(error: BaseException) -> BaseException:
    """The first real error inside ``error`` (cancellations that it caused are skipped)."""
    while isinstance(error, BaseExceptionGroup):
        leaves = [e for e in error.exceptions if not isinstance(e, trio.Cancelled)]
        error = leaves[0] if leaves else error.exceptions[0]
    return error


def describe(error: BaseException) -> str:
    """One line: a MigratorError's own message, else ``Type: message``."""
    error = first_cause(error)
    if isinstance(error, trio.TooSlowError):
        return "timed out"   # a deadline without a name (the named ones raise DeadlineExceeded)
    if isinstance(error, trio.Cancelled):
        return "cancelled"   # the command is stopping (Ctrl-C, SIGTERM): it says which
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, MigratorError) else f"{type(error).__name__}: {text}"


def expected_cause(error: BaseException) -> BaseException:
    """What the command line reports for ``error``: Ctrl-C if it is inside, else the only error
    when that is an expected one (a MigratorError or an OSError); otherwise ``error`` itself,
    traceback and all, since it is a bug."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    if error.subgroup(KeyboardInterrupt) is not None:
        return KeyboardInterrupt()
    leaves = leaf_exceptions(error)
    if len(leaves) == 1 and isinstance(leaves[0], (MigratorError, OSError)):
        return leaves[0]
    return error
