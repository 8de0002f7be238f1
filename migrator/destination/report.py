"""What the destination of one migration did, as a frozen value: ``ReceiveReport``.

Built once, when the migration ends (resumed or discarded), and serialised in one place
(``to_dict``): the JSON ``receive --report`` writes, ``docs/schemas/migrator.receive.v1.json``
generated from it. Its ``id`` is the source's migration id (from the Layout), so the two ends'
reports of one migration can be matched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Literal

from ..core.documents import Schema, read, to_data
from .postcopy import ReceivedPostcopy


@dataclass(frozen=True, slots=True)
class ReceivedRound:
    """One RoundEnd the source sent: its round, the pages it announced, and whether it was the
    final copy (sent while the source was frozen)."""

    round: int
    pages: int
    final: bool


@dataclass(frozen=True, slots=True)
class ReceiveReport:
    """One received migration. ``result`` is "resumed" (the guest runs here) or "discarded"."""

    SCHEMA: ClassVar[str] = "migrator.receive"

    schema: Schema
    migrator_version: str
    started_at: str                  # ISO 8601, UTC
    id: str                          # the source's migration id ("" if its Layout never came)
    peer: str | None                 # the source's address
    kind: Literal["receive", "restore"]
    source_layout: tuple[tuple[int, int], ...] | None   # (start, length) per region; None before the Layout
    guest_pid: int | None
    guest_control: str | None
    restore_guest: Literal["prepared", "started"]
    rounds: tuple[ReceivedRound, ...]
    pages_applied: int
    pages_placed: int                # of those, received straight into the guest's memory (a memfd guest)
    apply_s: float                   # worker-thread time writing pages and hashing them
    parts_ms: Mapping[str, float]    # spawn_guest, page_digest, check, resume, since_freeze …
    self_check: Literal["final copy", "region", "none"]   # what the guest's check inside the downtime covered
    total_s: float
    result: Literal["resumed", "discarded"]
    error: str | None
    postcopy: ReceivedPostcopy | None = None   # a post-copy switch: its faults and pages

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts_ms", MappingProxyType(dict(self.parts_ms)))

    def to_dict(self) -> dict:
        """The report as JSON-ready data: the one serialisation of it."""
        return to_data(self)

    @classmethod
    def from_dict(cls, data: object):
        """A report read back (parsed JSON); MigratorError with one line naming a bad field."""
        return read(cls, data)

