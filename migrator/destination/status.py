"""What a receiver is doing, for its control socket's ``status``: the migrations in progress and
the guests it resumed."""

from __future__ import annotations

from ..core.errors import MigratorError
from .engine import DestinationMigration


class Receiving:
    """The migrations one receiver has handled; ``answer`` serves ``transport.control`` requests."""

    def __init__(self) -> None:
        self.active: list[DestinationMigration] = []
        self.resumed: list[dict] = []

    def started(self, migration: DestinationMigration) -> None:
        self.active.append(migration)

    def ended(self, migration: DestinationMigration) -> None:
        self.active.remove(migration)
        if migration.resumed and migration.guest is not None:
            self.resumed.append({"id": migration.id, "guest_pid": migration.guest.pid,
                                 "guest_control": migration.guest.control})

    def answer(self, request) -> dict:
        if request.op != "status":
            raise MigratorError(f"a receiver answers status only: {request.op} a migration at its source")
        return {"migrations": [{"id": m.id, "peer": getattr(m.channel, "name", None),
                                "state": f"round {m.rounds[-1].round + 1}" if m.rounds else "starting",
                                "pages_applied": m.pages_applied} for m in self.active],
                "resumed": list(self.resumed)}
