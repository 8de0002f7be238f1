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
        return {"migrations": [{"id": m.id, "peer": getattr(m.channel, "name", None), "state": state_of(m),
                                "pages_applied": m.pages_applied} for m in self.active],
                "resumed": list(self.resumed)}


def state_of(migration) -> str:
    """What a migration in progress is doing, in a word or two: "starting", "round N" (receiving
    it), "switch-over" (the final copy is in: verifying, then resuming the guest), "post-copy"
    (the guest runs, its stale pages still arriving) or "resumed" (done, its end being recorded)."""
    if migration.resumed:
        return "post-copy" if migration.postcopy is not None else "resumed"
    if not migration.rounds:
        return "starting"
    last = migration.rounds[-1]
    return "switch-over" if last.final else f"round {last.round + 1}"
