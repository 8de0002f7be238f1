"""migrator's public Python API: what the command line uses, for programs.

Every call is async (trio)::

    import trio, migrator

    async def main():
        migration = migrator.Migration("/tmp/g.sock", "10.0.0.2:7000", migrator.MigrateSettings(bandwidth=100e6))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(show, migration)
            report = await migration.run()          # MigrationFailed(committed=...) if it failed
        print(report.to_dict())

    async def show(migration):
        async for progress in migration.watch():    # frozen Progress values, 5 a second
            print(progress.round, progress.remaining_bytes, progress.eta_s)
            if progress.round == 3:
                migration.set_parameters(bandwidth=50e6, downtime_ms=20)   # from the next round
            # migration.cancel(): before the switch-over, the source resumes

- ``Migration(guest_control, address, settings, *, on_progress=None, control=False)``: one live
  migration; ``run()``, ``watch()``, ``cancel()``, ``set_parameters(bandwidth=, downtime_ms=,
  max_rounds=)``, ``latest`` (the last Progress), ``report`` (a ``MigrationReport``).
- ``ResumedPostcopy(guest_control, address, migration, settings=ResumeSettings(...), *, log=None)``:
  finish a post-copy interrupted past its commit whose migrator is gone or gave up (what
  ``migrator migrate --resume`` runs); ``run()`` returns a ``MigrationReport`` (``settings.mode``
  ``"resume"``). ``find_interrupted(guest_control)`` says which migration froze a guest (an
  ``InterruptedPostcopy``), or raises ``ResumeRefused``.
- ``receive(listen, settings, *, token, tls, once, on_report, on_failure, log, prepare, control,
  limits, handshake_timeout, frame_macs)``: serve migrations, resuming each guest (what ``migrator receive``
  runs); ``prepare`` keeps a restore guest of that many bytes ready, ``control`` is a path for a
  control socket answering ``status``; ``task_status.started`` gives the bound address
  (``await nursery.start(receive, ...)``).
- ``take_checkpoint(guest_control, image_dir, settings, *, parent=None)`` and
  ``restore_chain(image_dir, settings)``: images (``CheckpointReport``, ``RestoreReport``).
- ``control_request(path, {"op": "status"|"cancel"|"set", ...})`` talks to a running command's
  control socket from another process (``running_controls()`` lists them).

Reports are frozen dataclasses with ``to_dict``/``from_dict`` (their JSON Schemas are in
``docs/schemas/``); errors are ``MigratorError`` subclasses (``migrator.core.errors``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable

import trio

from .checkpoint.engine import CheckpointReport, CheckpointSettings, take_checkpoint
from .checkpoint.restore import RestoreReport, RestoreSettings, restore_chain
from .core.errors import MigrationFailed, MigratorError, ResumeRefused
from .destination.engine import RECEIVE_BUFFERS, DestinationMigration, ReceiveSettings
from .destination.guests import RestoreGuests
from .destination.report import ReceiveReport
from .destination.status import Receiving
from .source.migration import MigrateSettings
from .source.migration import SourceMigration as Migration
from .source.progress import Progress
from .source.report import MigrationReport, RoundStats
from .source.resume import InterruptedPostcopy, ResumedPostcopy, ResumeSettings, find_interrupted
from .transport import HandshakeLimits, client_context, serve, server_context
from .transport.control import control_path, serve_control
from .transport.control import request as control_request
from .transport.control import running as running_controls
from .transport.net import HANDSHAKE_TIMEOUT_S

__all__ = [
    "CheckpointReport", "CheckpointSettings", "HandshakeLimits", "InterruptedPostcopy", "MigrateSettings", "Migration",
    "MigrationFailed", "MigrationReport", "MigratorError", "Progress", "ReceiveReport", "ReceiveSettings",
    "RestoreReport", "RestoreSettings", "ResumeRefused", "ResumeSettings", "ResumedPostcopy", "RoundStats",
    "client_context", "control_path", "control_request", "find_interrupted", "receive", "restore_chain",
    "running_controls", "server_context", "take_checkpoint",
]


async def receive(listen: str, settings: ReceiveSettings = ReceiveSettings(), *, token: bytes | None = None,
                  tls=None, once: bool = False, on_report: Callable[[ReceiveReport], None] = lambda report: None,
                  log: Callable[[str], None] = lambda line: None,
                  on_failure: Callable[[MigratorError], None] = lambda error: None,
                  prepare: int | None = None, control: str | None = None,
                  limits: HandshakeLimits = HandshakeLimits(), handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                  frame_macs: bool = False, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Receive migrations on ``listen`` until cancelled (or, ``once``, after the first), each into
    a new restore guest resumed on the source's commit.

    ``on_report`` gets each migration's report (resumed or not), ``on_failure`` the error of each
    one that failed (after ``log`` said so); ``log`` gets the engines' lines. ``prepare`` (bytes)
    keeps a restore guest of that size started and faulted in ahead, as QEMU's ``-incoming`` with
    ``-mem-prealloc``, so a migration of that size waits for neither; the receive buffers of a
    session's first frames are faulted in ahead too. ``control`` opens a control
    socket at that path answering ``status`` (migrations in progress, guests resumed);
    ``control_path("receive-NAME")`` puts it where ``migrator status`` finds it. ``limits`` and
    ``handshake_timeout`` bound the connections still authenticating; ``frame_macs`` keeps MACs on
    every frame even on a link that looks protected (loopback behind a relay in clear). ``task_status.started``
    gives the bound address once it listens, the control socket (if any) answers and the
    prepared guest (if any) is starting: a migration of its size arriving then takes it. Restore
    guests are started in ``settings.control_dir`` (default: a temporary directory, removed at
    the end unless a resumed guest's socket is in it); those nobody resumed are killed at the end.
    """
    made_dir = None if settings.control_dir else tempfile.mkdtemp(prefix="migrator-")
    guests = RestoreGuests(settings.control_dir or made_dir, memfd=settings.memfd, prepare=prepare, log=log)
    receiving = Receiving()
    try:
        async with trio.open_nursery() as nursery:

            async def handle(channel) -> None:
                migration = DestinationMigration(channel, settings, log=log, guests=guests)
                receiving.started(migration)
                try:
                    await migration.run()
                except MigratorError as exc:
                    log(f"migration failed: {exc}")
                    on_failure(exc)
                finally:
                    receiving.ended(migration)
                    if getattr(migration, "report", None) is not None:
                        on_report(migration.report)
                    # a refused Resume was no migration: the post-copy it named (if any) waits on
                    refused_resume = migration.resuming and getattr(migration, "report", None) is not None \
                        and migration.report.error is not None
                    if once and not refused_resume:
                        nursery.cancel_scope.cancel()

            address = await nursery.start(functools.partial(
                serve, listen, handle, token=token, tls=tls, limits=limits, handshake_timeout=handshake_timeout,
                frame_macs=frame_macs, receive_buffers=RECEIVE_BUFFERS if prepare else 0))
            if control is not None:
                await nursery.start(serve_control, control, receiving.answer)
            await nursery.start(functools.partial(guests.keep_prepared, again=not once))
            task_status.started(address)
    finally:
        guests.close()      # restore guests nobody resumed or killed (a migration's cleanup was cut short)
        if made_dir is not None:
            with contextlib.suppress(OSError):   # not empty: a resumed guest's socket is in it
                os.rmdir(made_dir)
