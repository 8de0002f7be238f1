"""SIGTERM and SIGHUP end a command the way Ctrl-C does: its engines clean up, then one line.

``kill`` (or a closing terminal, or a service manager stopping it) would otherwise end the
process on the spot: a source guest stopped by the throttle stays stopped, a destination never
hears that the migration is off, no report is written. Every command that runs trio does so
through ``run`` instead of ``trio.run``: a task watches ``trio.open_signal_receiver`` for SIGTERM
and SIGHUP and cancels the command's work. Cancellation unwinds every engine through its
cleanup, exactly as the cancellations Ctrl-C causes do: before the point of no return the source
thaws and resumes its guest and tells the destination to discard its copy; the destination
kills the restore guest it had not resumed.

Before the loop starts, what the command's startup made is moved out of the cyclic collector's
reach (``core.heap.settle_heap``), so a full collection during a migration walks only what the
migration made instead of stopping every thread for milliseconds.

The command then ends with ``Interrupted``, which ``cli.main`` prints as one line and turns
into exit status 128 + the signal's number, as a shell reports a process killed by it (143 for
SIGTERM, 129 for SIGHUP; Ctrl-C keeps its 130). A second signal while cleaning up is ignored;
SIGKILL still ends everything at once.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from ..core.errors import MigrationFailed
from ..core.heap import settle_heap

SIGNALS = (signal.SIGTERM, signal.SIGHUP)
T = TypeVar("T")


class Interrupted(Exception):
    """The command was ended by ``signum``; ``str()`` is the line to print."""

    def __init__(self, signum: int, error: BaseException | None = None) -> None:
        self.signum = signum
        line = f"interrupted by {signal.Signals(signum).name}"
        if isinstance(error, MigrationFailed):
            line += f" after the point of no return: {error}" if error.committed else " before the point of no return"
        super().__init__(line)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def run(async_fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """``trio.run(async_fn, *args)``, cancelled by SIGTERM or SIGHUP: then ``Interrupted``
    (from whatever the work raised while it unwound). Work that finished before the signal
    could stop it returns as usual."""
    received: list[int] = []
    work = trio.CancelScope()

    async def watch(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(*SIGNALS) as signals:
            task_status.started()
            async for signum in signals:
                if not received:
                    received.append(signum)
                    work.cancel()

    async def main():
        failed: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(watch)
            try:
                with work:
                    return await async_fn(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, outside the nursery
                failed.append(exc)        # (inside it, it would come out wrapped in a group)
            finally:
                nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        return None                       # the work was cancelled and said nothing more

    settle_heap()
    try:
        result = trio.run(main)
    except BaseException as exc:
        if received and not isinstance(exc, KeyboardInterrupt):
            raise Interrupted(received[0], exc) from exc
        raise
    if received and work.cancelled_caught:
        raise Interrupted(received[0])
    return result

