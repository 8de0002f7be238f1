"""The migration stream as a sans-IO codec (shaped like h11): events in, bytes out, and back.

No trio, no sockets, no threads here: ``migrator.transport`` moves the bytes. See
``connection.py`` for the API, ``_frames.py`` for the wire format, ``_handshake.py`` for the
authentication and ``_state.py`` for what may be sent when.
"""

from ._frames import CHECKSUM_FRAMES, DEFAULT_MAX_FRAME
from ._payload import ZERO_PAGES, Compression, decode_payload, encode_payload
from ._state import Role, State
from .connection import NEED_DATA, Connection, ConnectionStats, IncomingPages, PendingFrame, PendingPages, PlacedPages
from .events import (
    DATA_EVENTS, EVENT_TYPES, NATIVE_FAULTS, POSTCOPY_FEATURE, POSTCOPY_SESSION, PROTOCOL_VERSION, URGENT_STREAM, Abort, Ack, Acked, Auth, Commit, ConnectionClosed, Digest, DigestKind,
    Discard, Event, Fence, Freeze, Hello, Index, IndexEntry, Lacking, Layout, Pages, Request, Resume, RoundEnd, Scalar, Switch,
    Zero,
)

__all__ = [
    "CHECKSUM_FRAMES", "DATA_EVENTS", "DEFAULT_MAX_FRAME", "EVENT_TYPES", "NATIVE_FAULTS", "NEED_DATA", "POSTCOPY_FEATURE", "POSTCOPY_SESSION", "PROTOCOL_VERSION",
    "Abort", "Ack", "Acked", "Auth", "Commit", "Compression", "Connection", "ConnectionClosed", "ConnectionStats",
    "Digest", "DigestKind", "Discard", "Event", "Fence", "Freeze", "Hello", "IncomingPages", "Index", "IndexEntry", "Lacking",
    "Layout", "Pages", "PendingFrame", "PendingPages", "PlacedPages", "Request", "Resume", "URGENT_STREAM", "Role", "RoundEnd", "Scalar", "State", "Switch", "Zero",
    "ZERO_PAGES", "decode_payload", "encode_payload",
]
