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
- ``receive(listen, settings, *, token, tls, once, on_report)``: serve migrations, resuming each
  guest; ``task_status.started`` gives the bound address (``await nursery.start(receive, ...)``).
- ``take_checkpoint(guest_control, image_dir, settings, *, parent=None)`` and
  ``restore_chain(image_dir, settings)``: images (``CheckpointReport``, ``RestoreReport``).
- ``control_request(path, {"op": "status"|"cancel"|"set", ...})`` talks to a running command's
  control socket from another process (``running_controls()`` lists them).

Reports are frozen dataclasses with ``to_dict``/``from_dict`` (their JSON Schemas are in
``docs/schemas/``); errors are ``MigratorError`` subclasses (``migrator.core.errors``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import trio

from .checkpoint.engine import CheckpointReport, CheckpointSettings, take_checkpoint
from .checkpoint.restore import RestoreReport, RestoreSettings, restore_chain
from .core.errors import MigrationFailed, MigratorError
from .destination.engine import DestinationMigration, ReceiveSettings
from .destination.report import ReceiveReport
from .source.migration import MigrateSettings
from .source.migration import SourceMigration as Migration
from .source.progress import Progress
from .source.report import MigrationReport, RoundStats
from .transport import client_context, serve, server_context
from .transport.control import request as control_request
from .transport.control import running as running_controls

__all__ = [
    "CheckpointReport", "CheckpointSettings", "MigrateSettings", "Migration", "MigrationFailed", "MigrationReport",
    "MigratorError", "Progress", "ReceiveReport", "ReceiveSettings", "RestoreReport", "RestoreSettings", "RoundStats",
    "client_context", "control_request", "receive", "restore_chain", "running_controls", "server_context",
    "take_checkpoint",
]


async def receive(listen: str, settings: ReceiveSettings = ReceiveSettings(), *, token: bytes | None = None,
                  tls=None, once: bool = False, on_report: Callable[[ReceiveReport], None] = lambda report: None,
                  log: Callable[[str], None] = lambda line: None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Receive migrations on ``listen`` until cancelled (or, ``once``, after the first), each into
    a new restore guest resumed on the source's commit; ``on_report`` gets each one's report."""
    async with trio.open_nursery() as nursery:

        async def handle(channel) -> None:
            migration = DestinationMigration(channel, settings, log=log)
            try:
                await migration.run()
            except MigrationFailed as exc:
                log(f"migration failed: {exc}")
            finally:
                if getattr(migration, "report", None) is not None:
                    on_report(migration.report)
                if once:
                    nursery.cancel_scope.cancel()

        address = await nursery.start(functools.partial(serve, listen, handle, token=token, tls=tls))
        task_status.started(address)
