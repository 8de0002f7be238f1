"""The committed-state file: how a source guest that must never run again says so.

At the point of no return the source migrator makes its guest's stop permanent (see
``migrator.source.freeze``) and writes ``<control socket>.state`` beside the guest's socket::

    {"state": "committed", "migration": "5f0c...", "destination": "10.0.0.2:7000",
     "committed_at": "2025-01-31T12:00:00.123Z", "committed_unix": 1738324800.123,
     "pid": 4242, "pid_start": 1234567, "migrator_pid": 4300,
     "switch_round": 1, "page_size": 4096, "regions": [[140012345344000, 67108864]]}

A stopped guest answers nothing on its control socket, so this file is also its memory of the
migration: ``switch_round`` is set when the commit was a post-copy's (the destination's guest
then runs before it has every page, and this frozen memory is the only copy of the rest), and
``page_size`` and ``regions`` are the Layout it announced. With them ``migrate --resume`` finishes
an interrupted post-copy after the migrator that started it is gone (``migrator.source.resume``).
Files written before these fields existed read with them empty.

Whoever finds a source guest stopped (state T) can tell the two outcomes apart from the source
side alone: with the file, Commit may have reached the destination and the copy there is the one
that runs, so this one must not; without it the migration never committed and nothing holds the
guest stopped for good (a migrator that dies before the commit leaves its guest running). The
guest's own tools refuse to run a guest whose file names it: the ``resume`` request,
``GuestClient.resume`` and ``GuestClient.thaw``, and the guest itself, which stops again when a
plain SIGCONT wakes it. To run such a source anyway (once sure the destination never resumed its
copy), remove the file first.

``pid`` and ``pid_start`` (field 22 of /proc/PID/stat: start time in clock ticks since boot) tie
the file to one process: a file left behind by a guest that is gone never applies to a new process
that reuses the pid or the socket path, and the migrator removes it once it has killed the guest.

Written atomically (a temporary file in the same directory, renamed over the name) and without
fsync: the file matters only as long as the stopped guest it describes, which a machine crash
takes with it. Read as hostile input: at most ``MAX_BYTES``, JSON, every field checked; a file that
cannot be read counts as committed (the safe side), and the refusal says so.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass

from ..core.errors import GuestError

SUFFIX = ".state"
MAX_BYTES = 4096
MAX_REGIONS = 64         # regions a record may list (a guest has one)
STATE_COMMITTED = "committed"


@dataclass(frozen=True, slots=True)
class CommitRecord:
    migration: str          # the source migration's id (its report's and the destination's logs)
    destination: str        # where Commit was sent
    committed_unix: float
    pid: int                # the guest process it describes...
    pid_start: int          # ...and that process's start time, so a recycled pid never matches
    migrator_pid: int
    switch_round: int | None = None     # a post-copy's switch round; None: a pre-copy commit
    page_size: int = 0                  # the Layout the migration announced (0, (): not recorded)
    regions: tuple[tuple[int, int], ...] = ()

    @property
    def postcopy(self) -> bool:
        """Whether the commit was a post-copy's: the destination may still lack pages of this guest."""
        return self.switch_round is not None

    def applies_to(self, pid: int) -> bool:
        return pid == self.pid and process_start(pid) == self.pid_start

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.committed_unix))
        kind = " (post-copy)" if self.postcopy else ""
        return f"migration {self.migration} committed it to {self.destination or '?'} at {when} UTC{kind}"

    def to_json(self) -> bytes:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.committed_unix))
        doc = {"state": STATE_COMMITTED, **asdict(self),
               "committed_at": f"{when}.{int(self.committed_unix * 1000) % 1000:03d}Z"}
        return json.dumps(doc, indent=1).encode() + b"\n"


def state_path(control: str) -> str:
    return control + SUFFIX


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot), None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])   # field 22 of the line; fields[0] is field 3 (the state)


def new_record(pid: int, migration: str, destination: str, *, switch_round: int | None = None,
               page_size: int = 0, regions: tuple[tuple[int, int], ...] = ()) -> CommitRecord:
    start = process_start(pid)
    if start is None:
        raise GuestError(f"guest pid {pid} exited")
    return CommitRecord(migration=migration, destination=destination, committed_unix=time.time(),
                        pid=pid, pid_start=start, migrator_pid=os.getpid(), switch_round=switch_round,
                        page_size=page_size, regions=tuple((int(a), int(n)) for a, n in regions))


def read_record(control: str) -> CommitRecord | None:
    """The record beside ``control``; None when there is none. GuestError (one line) when the
    file exists but cannot be trusted."""
    path = state_path(control)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise GuestError(f"state file {path} cannot be read ({exc.strerror})") from None
    try:
        if len(data) > MAX_BYTES:
            raise ValueError(f"longer than {MAX_BYTES} bytes")
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("state") != STATE_COMMITTED:
            raise ValueError("no 'state': 'committed'")
        fields = {name: doc[name] for name in CommitRecord.__dataclass_fields__ if name in doc or name in _REQUIRED}
        if isinstance(fields.get("regions"), list):
            fields["regions"] = tuple(tuple(r) if isinstance(r, list) else r for r in fields["regions"][:MAX_REGIONS + 1])
        record = CommitRecord(**fields)
        _check_types(record)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise GuestError(f"state file {path} is malformed ({exc})") from None
    return record


def refusal(control: str, pid: int, action: str) -> str | None:
    """One line refusing ``action`` (``resume``, ``thaw``) when the state file says a migration
    committed guest ``pid``; None when it may go ahead."""
    path = state_path(control)
    try:
        record = read_record(control)
    except GuestError as exc:
        return f"refusing to {action} guest pid {pid}: {exc}; a migration may have committed it (remove the file once you know where it runs)"
    if record is None or not record.applies_to(pid):
        return None
    return (f"refusing to {action} guest pid {pid}: {record.describe()}; its copy there is the live one "
            f"(remove {path} to run this one anyway)")


def discard_stale(control: str, *, killed: int | None = None) -> None:
    """Remove the state file beside ``control`` if the process it names is gone, or is
    ``killed`` (its pid, sent SIGKILL by the caller: it never runs again, whenever it exits)."""
    try:
        record = read_record(control)
    except GuestError:
        return   # not ours to judge: the refusal says what to do with it
    if record is not None and (record.pid == killed or process_start(record.pid) != record.pid_start):
        try:
            os.unlink(state_path(control))
        except FileNotFoundError:
            pass


class StagedRecord:
    """A record written under a temporary name: ``publish`` renames it into place (the commit's
    last step), ``discard`` removes it. Staging first leaves only a rename after the stop is
    made permanent, and a full or read-only disk fails the commit before anything changed."""

    def __init__(self, control: str, record: CommitRecord) -> None:
        self.path = state_path(control)
        self.record = record
        directory, name = os.path.split(self.path)
        self._tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, record.to_json())
            finally:
                os.close(fd)
        except OSError as exc:
            self.discard()
            raise GuestError(f"cannot write the state file {self.path}: {exc.strerror}") from None

    def publish(self) -> None:
        try:
            os.rename(self._tmp, self.path)
        except OSError as exc:
            self.discard()
            raise GuestError(f"cannot write the state file {self.path}: {exc.strerror}") from None

    def discard(self) -> None:
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


_REQUIRED = ("migration", "destination", "committed_unix", "pid", "pid_start", "migrator_pid")


def _check_types(record: CommitRecord) -> None:
    for name, kind in (("migration", str), ("destination", str), ("pid", int), ("pid_start", int),
                       ("migrator_pid", int)):
        value = getattr(record, name)
        if type(value) is not kind or (kind is str and len(value) > 512) or (kind is int and value < 0):
            raise ValueError(f"bad {name}")
    if type(record.committed_unix) not in (int, float) or not 0 <= record.committed_unix < 1e11:
        raise ValueError("bad committed_unix")
    if record.switch_round is not None and (type(record.switch_round) is not int or record.switch_round < 0):
        raise ValueError("bad switch_round")
    if type(record.page_size) is not int or record.page_size < 0:
        raise ValueError("bad page_size")
    if type(record.regions) is not tuple or len(record.regions) > MAX_REGIONS or not all(
            type(r) is tuple and len(r) == 2 and all(type(v) is int and 0 <= v < 1 << 64 for v in r)
            for r in record.regions):
        raise ValueError("bad regions")
