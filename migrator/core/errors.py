"""Every error migrator raises on purpose.

::

    MigratorError
    ├── TrackerError             a dirty-page tracker cannot be used or failed
    │   └── TrackerUnavailable   the kernel or the user's rights lack a feature (says which)
    ├── GuestError               the guest process or its control socket misbehaved
    ├── ProtocolError            the migration stream is wrong
    │   ├── LocalProtocolError   we misused the codec (raised from send and constructors)
    │   └── RemoteProtocolError  the peer sent bad data (raised only from next_event)
    ├── TransportError           a connection or file failed underneath the codec
    ├── ImageError               a checkpoint image is truncated, corrupted or incomplete
    ├── TraceError               a write trace file is not one, or is truncated or inconsistent
    ├── OutputError              an output file cannot be written where asked (a link, no directory)
    ├── DeadlineExceeded         a phase made no progress within its timeout (says which)
    ├── ResumeRefused            ``migrate --resume`` found no interrupted post-copy to finish
    │                            there (wrong id, a guest not frozen by one); nothing was sent
    └── MigrationFailed          a migration stopped; ``committed`` says on which side of the
                                 point of no return

Kernel calls raise ``OSError`` with the kernel's errno; the public APIs wrap those as
``TrackerError(...) from exc`` where a caller needs a migrator type.
"""

from __future__ import annotations


class MigratorError(Exception):
    """Base of all migrator errors. ``str(err)`` is a one-line message for the user."""


class TrackerError(MigratorError):
    pass


class TrackerUnavailable(TrackerError):
    """A tracker cannot run here; the message names the missing kernel feature or right."""


class GuestError(MigratorError):
    pass


class ProtocolError(MigratorError):
    pass


class LocalProtocolError(ProtocolError):
    pass


class RemoteProtocolError(ProtocolError):
    pass


class TransportError(MigratorError):
    pass


class ImageError(MigratorError):
    pass


class TraceError(MigratorError):
    """A trace file (``migrator track --record``) is refused; the message says what is wrong."""


class OutputError(MigratorError):
    """An output path is refused (a symbolic link, a missing or read-only directory) or its
    write failed; the message names the path (``migrator.core.files``)."""


class DeadlineExceeded(MigratorError):
    """A phase (handshake, round, switch-over, a silent peer) ran out of time; names which."""


class ResumeRefused(MigratorError):
    """``migrate --resume`` refused before sending anything: the guest, its state file or the id
    do not name a post-copy interrupted past its commit. The guest was left as it was."""


class MigrationFailed(MigratorError):
    """A migration did not complete.

    ``committed`` is False when it failed before the point of no return (the source guest was
    resumed and nothing is lost) and True when it failed after it (the source never resumes).
    """

    def __init__(self, message: str, *, committed: bool = False) -> None:
        super().__init__(message)
        self.committed = committed

