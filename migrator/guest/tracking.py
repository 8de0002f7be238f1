"""The guest's own userfaultfd registration, and which control connection owns a synchronous one.

The guest registers its region for WP_ASYNC at start, so any migrator that attaches can scan it.
A migrator that asks for ``sync-wp`` gets a fresh synchronous registration instead: the guest's
writer then blocks on each first write to a protected page until that migrator resolves it. If
that migrator disappears (its control connection closes), the guest unprotects and unregisters
(``release_tracking``) so the writer never stays blocked, then registers for WP_ASYNC again.
Re-registering makes uffds handed out earlier useless: a migrator attaches again.

One tracker at a time: every scan re-protects the pages it reports, so a second migrator or
checkpoint scanning the same guest would steal the first one's dirty pages and both would copy an
inconsistent region. The first connection that attaches with a tracker owns tracking until it
closes; another one is refused with a message saying so ("none" attaches are never refused).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from ..core.errors import GuestError, MigratorError
from ..core.model import Region
from ..tracker.handover import register_for_tracking, release_tracking

TRACKERS = ("wp-async", "sync-wp", "none")


class GuestTracking:
    """Holds the guest's uffd; thread-safe (control connections attach and leave concurrently)."""

    def __init__(self, regions: Sequence[Region]) -> None:
        self.regions = tuple(regions)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._sync_owner: object | None = None
        self._owner: object | None = None      # the connection tracking the guest now
        self.unavailable: str | None = None   # why WP_ASYNC registration failed, if it did
        try:
            self._fd = register_for_tracking(self.regions, "async")
        except (MigratorError, OSError) as exc:
            self.unavailable = str(exc)

    def attach(self, tracker: str, owner: object) -> int | None:
        """The uffd to hand to ``owner`` for ``tracker`` (None for "none"); the guest keeps it."""
        if tracker not in TRACKERS:
            raise GuestError(f"tracker {tracker!r}: expected one of {', '.join(TRACKERS)}")
        if tracker == "none":
            return None
        with self._lock:
            if self._owner is not None and self._owner is not owner:
                raise GuestError("another migrator or checkpoint is tracking this guest (its control connection "
                                 "is open); one tracker at a time, or its scans would steal each other's pages")
            if tracker == "sync-wp":
                if self._sync_owner is None:
                    self._reregister("sync")
                    self._sync_owner = owner
            elif self._sync_owner is owner:
                self._sync_owner = None
                self._reregister("async")
            if self._fd is None:
                raise GuestError(f"write-protect tracking is unavailable in this guest: {self.unavailable}")
            self._owner = owner
            return self._fd

    def detach(self, owner: object) -> None:
        """``owner``'s connection closed: drop its synchronous registration, back to WP_ASYNC."""
        with self._lock:
            if self._owner is owner:
                self._owner = None
            if self._sync_owner is owner:
                self._sync_owner = None
                self._reregister("async")

    def _reregister(self, mode: str) -> None:
        if self._fd is not None:
            release_tracking(self._fd, self.regions)   # unprotects first: wakes a blocked writer
            os.close(self._fd)
            self._fd = None
        try:
            self._fd = register_for_tracking(self.regions, mode)
            self.unavailable = None
        except (MigratorError, OSError) as exc:
            self.unavailable = str(exc)
            if mode == "sync":
                self._reregister("async")
                raise GuestError(f"cannot register for sync-wp: {exc}") from exc
