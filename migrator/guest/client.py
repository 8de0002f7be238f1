"""Synchronous client of a guest's control socket, for engines, tests and scripts.

Every call has a socket timeout; a timeout, a closed socket or an error reply raises GuestError.
After a timeout the connection is closed (a late reply would be mistaken for the next one).
A ``sync-wp`` attachment lives as long as the client that made it: closing the client (or the
process dying) makes the guest drop the synchronous registration.

A guest that a migration committed (its state file says so, see ``migrator.guest.committed``)
runs at the destination now: ``resume`` and ``thaw`` refuse it here, before asking the guest.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from dataclasses import dataclass

from ..core.errors import GuestError
from ..core.model import MemoryLayout, Region
from ..tracker.handover import recv_fds
from . import committed
from .control import MAX_CHECK_RUNS, LineBuffer, encode, encode_pages, parse_reply

MAX_FDS = 4


@dataclass(frozen=True, slots=True)
class Attachment:
    """What ``attach`` hands over. The caller owns ``uffd`` and ``memfd`` (``close()`` them)."""

    layout: MemoryLayout
    uffd: int | None
    memfd: int | None
    restore: bool
    steps: int

    def close(self) -> None:
        for fd in (self.uffd, self.memfd):
            if fd is not None:
                os.close(fd)


class GuestClient:
    """One connection to a guest's control socket at ``path``."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._lines = LineBuffer()
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
            # who listens there, known from the socket even while the guest is stopped
            self.pid = struct.unpack("3i", self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except OSError as exc:
            self._sock.close()
            raise GuestError(f"cannot connect to the guest control socket {path}: {exc.strerror or exc}") from exc

    def __enter__(self) -> GuestClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- requests -------------------------------------------------------------------------------

    def request(self, cmd: str, **args) -> dict:
        """Send ``{"cmd": cmd, **args}`` (None-valued args left out); the ``ok`` reply as a dict."""
        reply, fds = self._exchange(cmd, args)
        for fd in fds:
            os.close(fd)
        return reply

    def attach(self, tracker: str = "wp-async") -> Attachment:
        reply, fds = self._exchange("attach", {"tracker": tracker})
        try:
            return _attachment(reply, fds)
        except (KeyError, TypeError, ValueError) as exc:
            for fd in fds:
                os.close(fd)
            raise GuestError(f"guest {self.path}: malformed attach reply ({exc!r})") from None

    def stats(self) -> dict:
        return self.request("stats")

    def digest(self) -> str:
        return self.request("digest")["digest"]

    def check(self, deep: bool = True, pages: bytes | None = None) -> dict:
        """The guest's self-check; ``deep=False`` skips page bodies. ``pages`` limits it to those
        runs of region pages (native 64-bit (first, count) pairs, at most ``MAX_CHECK_RUNS``):
        a downtime's final copy."""
        if pages is None:
            return self.request("check", deep=deep)
        return self.request("check", deep=deep, pages=encode_pages(pages))

    def discard(self, pairs: bytes) -> dict:
        """Post-copy: a restore guest that never resumed drops the pages of ``pairs`` (native
        64-bit (first region page, count) pairs), so that touching one faults to the holder of
        its uffd registered MISSING. Sent ``MAX_CHECK_RUNS`` runs a request; the totals
        ``{"pages": N, "runs": R}`` (R: runs dropped, those of no pages left out)."""
        if len(pairs) % 16:
            raise GuestError(f"discard: {len(pairs)} bytes are not whole (first, count) pairs of 8 bytes")
        chunk = 16 * MAX_CHECK_RUNS
        totals = {"pages": 0, "runs": 0}
        for at in range(0, max(len(pairs), 1), chunk):   # one request at least: a refusal is seen
            reply = self.request("discard", pages=encode_pages(pairs[at : at + chunk]))
            for key in totals:
                if type(reply.get(key)) is not int:
                    raise GuestError(f"guest {self.path}: malformed discard reply")
                totals[key] += reply[key]
        return totals

    def pause(self, at_step: int | None = None) -> int:
        """Pause at a step boundary (or once exactly ``at_step`` steps are done); the step count."""
        return self.request("pause", at_step=at_step)["steps"]

    def resume(self, until_step: int | None = None) -> None:
        self._refuse_if_committed("resume")
        self.request("resume", until_step=until_step)

    def thaw(self) -> None:
        """Continue a guest stopped by a signal (SIGCONT), unless a migration committed it."""
        self._refuse_if_committed("thaw")
        try:
            pidfd = os.pidfd_open(self.pid)
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGCONT)
            finally:
                os.close(pidfd)
        except OSError as exc:
            raise GuestError(f"cannot thaw guest pid {self.pid}: {exc.strerror}") from None

    def commit_record(self) -> committed.CommitRecord | None:
        """The state file's record when it names this guest (GuestError if it cannot be read)."""
        record = committed.read_record(self.path)
        return record if record is not None and record.applies_to(self.pid) else None

    def _refuse_if_committed(self, action: str) -> None:
        refusal = committed.refusal(self.path, self.pid, action)
        if refusal:
            raise GuestError(refusal)

    def set_tag(self, tag: str) -> None:
        self.request("set-tag", tag=tag)

    def quit(self) -> None:
        self.request("quit")
        self.close()

    # --- the wire --------------------------------------------------------------------------------

    def _exchange(self, cmd: str, args: dict) -> tuple[dict, list[int]]:
        if self._sock is None:
            raise GuestError(f"guest {self.path}: the control connection is closed")
        message = {"cmd": cmd, **{k: v for k, v in args.items() if v is not None}}
        fds: list[int] = []
        try:
            self._sock.sendall(encode(message))
            lines: list[bytes] = []
            while not lines:
                data, received = recv_fds(self._sock, 65536, MAX_FDS)
                fds.extend(received)
                if not data:
                    raise GuestError(f"guest {self.path}: connection closed during {cmd}")
                lines = self._lines.feed(data)
            if len(lines) > 1:
                raise GuestError(f"guest {self.path}: sent {len(lines)} replies to one {cmd}")
            reply = parse_reply(lines[0])
        except (GuestError, OSError) as exc:
            for fd in fds:
                os.close(fd)
            self.close()
            if isinstance(exc, TimeoutError):
                raise GuestError(f"guest {self.path}: no reply to {cmd} within {self.timeout:g} s") from None
            if isinstance(exc, OSError):
                raise GuestError(f"guest {self.path}: {cmd} failed: {exc}") from exc
            raise
        if not reply["ok"]:
            for fd in fds:
                os.close(fd)
            raise GuestError(f"guest {cmd}: {reply.get('error', 'failed without a message')}")
        return reply, fds


def _attachment(reply: dict, fds: list[int]) -> Attachment:
    """Build an Attachment from a reply, checking every field the caller will trust."""
    pid, page_size = reply["pid"], reply["page_size"]
    if type(pid) is not int or pid <= 0 or type(page_size) is not int or page_size <= 0:
        raise ValueError("bad pid or page_size")
    regions = []
    for entry in reply["regions"]:
        start, length = entry["start"], entry["length"]
        if not all(type(v) is int and v >= 0 for v in (start, length)) or length == 0:
            raise ValueError(f"bad region {entry}")
        if start % page_size or length % page_size or start + length > 1 << 64:
            raise ValueError(f"region {entry} is not page-aligned")
        regions.append(Region(start, length))
    wanted = int(bool(reply["uffd"])) + int(bool(reply["memfd"]))
    if len(fds) != wanted:
        raise ValueError(f"expected {wanted} descriptors, received {len(fds)}")
    uffd = fds[0] if reply["uffd"] else None
    memfd = fds[-1] if reply["memfd"] else None
    return Attachment(MemoryLayout(pid, page_size, tuple(regions)), uffd, memfd, bool(reply["restore"]), int(reply["steps"]))
