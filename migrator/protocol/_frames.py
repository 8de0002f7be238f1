"""Frame layout and per-frame integrity (checksum, or MAC under a session key).

::

    header   24 B  "<4sBBBBIIQ": magic "MGRT", version, type, flags, reserved (0),
                   meta length, payload length (as on the wire), sequence number
    meta           msgpack map of the event's fields (data only: no ext types, never code)
    payload        Pages only: raw or zstd-compressed page bytes (flag ZSTD); with flag ZEROS
                   a bitmap of the batch's zero pages (1 bit per page, little-endian) comes
                   first and those pages are left out (see _payload)
    payload tag    T bytes, only when there is a payload: tag of the payload bytes
    frame tag      T bytes: tag of header + meta + payload tag

Unauthenticated streams use xxh3-64 tags (T = 8) against corruption; after an authenticated
handshake every frame carries HMAC-SHA256/128 tags (T = 16, flag MAC) under direction-specific
keys, unless both Hellos list ``CHECKSUM_FRAMES``: each end says so only of a link that nobody
but root can write into (loopback, a unix socket) or that TLS protects, where a MAC would guard
against nobody and cost a third of both ends' CPU; the token is still proven in the handshake.
On such a link the payload tag is left zero (``PROTECTED``): the link cannot corrupt a payload
(TLS checks every record; loopback has no wire), hashing every payload cost each end's event
loop a tenth of a round's time, and the page digests still compare every page end to end. The
frame tag (header, meta, sequence number) stays. Recorded streams (images at rest) always carry
MACs. The payload tag is separate so the expensive
part (hashing megabytes) can run in a worker thread while the frame tag, which covers the
sequence number, is checked in order, cheaply.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

import xxhash

from ..core.errors import LocalProtocolError
from .events import (
    Abort, Ack, Auth, Commit, Digest, Discard, Event, Fence, Freeze, Hello, Index, Lacking, Layout, Pages, Request,
    Resume, RoundEnd, Switch, Zero,
)

MAGIC = b"MGRT"
FRAME_VERSION = 1
HEADER = struct.Struct("<4sBBBBIIQ")

F_ZSTD = 0x01      # the payload is one zstd frame
F_MAC = 0x02       # tags are HMACs under the session key
F_ZEROS = 0x04     # the payload starts with a zero-page bitmap; those pages are not sent
KNOWN_FLAGS = F_ZSTD | F_MAC | F_ZEROS

CHECKSUM_FRAMES = "checksum-frames"   # Hello feature: this side's link needs no per-frame MAC

DEFAULT_MAX_FRAME = 64 << 20
HANDSHAKE_MAX_FRAME = 64 << 10   # nothing large is accepted before the peer is authenticated

TYPE_CODES: dict[type[Event], int] = {
    Hello: 1, Auth: 2, Layout: 3, Pages: 4, Zero: 5, RoundEnd: 6, Freeze: 7, Digest: 8,
    Commit: 9, Ack: 10, Abort: 11, Fence: 12, Index: 13, Discard: 14, Switch: 15, Request: 16,
    Resume: 17, Lacking: 18,
}
TYPES: dict[int, type[Event]] = {code: kind for kind, code in TYPE_CODES.items()}


class Checksum:
    """xxh3-64 tags: detect corruption, prove nothing."""

    tag_size = 8
    flag = 0
    name = "checksum"

    def payload_tag(self, body) -> bytes:
        """``body``: the payload, or the views it was received into (a placed frame), in order."""
        if type(body) is not tuple:
            return xxhash.xxh3_64_digest(body)
        tag = xxhash.xxh3_64()
        for part in body:
            tag.update(part)
        return tag.digest()

    def frame_tag(self, header: bytes, meta: bytes, payload_tag: bytes) -> bytes:
        return xxhash.xxh3_64_digest(header + meta + payload_tag)


class Protected(Checksum):
    """A protected link's tags (see the module's docstring): the payload tag is zero, the frame
    tag an xxh3-64 of the header, meta and that zero tag."""

    _ZERO = bytes(Checksum.tag_size)

    def payload_tag(self, body) -> bytes:
        return self._ZERO


class Mac:
    """HMAC-SHA256 truncated to 128 bits (SHA-NI makes it ~2 GB/s here, twice keyed blake2b)."""

    tag_size = 16
    flag = F_MAC
    name = "MAC"

    def __init__(self, frame_key: bytes, payload_key: bytes) -> None:
        self._frame_key = frame_key
        self._payload_key = payload_key

    def payload_tag(self, body) -> bytes:
        if type(body) is not tuple:
            return hmac.digest(self._payload_key, body, "sha256")[:16]
        tag = hmac.new(self._payload_key, digestmod="sha256")
        for part in body:
            tag.update(part)
        return tag.digest()[:16]

    def frame_tag(self, header: bytes, meta: bytes, payload_tag: bytes) -> bytes:
        return hmac.digest(self._frame_key, header + meta + payload_tag, "sha256")[:16]


Integrity = Checksum | Mac
CHECKSUM = Checksum()
PROTECTED = Protected()


@dataclass(frozen=True, slots=True)
class Header:
    type_code: int
    flags: int
    meta_len: int
    payload_len: int
    seq: int

    @property
    def kind(self) -> type[Event]:
        return TYPES[self.type_code]

    @property
    def tag_size(self) -> int:
        return Mac.tag_size if self.flags & F_MAC else Checksum.tag_size

    @property
    def total(self) -> int:
        return frame_size(self.meta_len, self.payload_len, self.tag_size)


def frame_size(meta_len: int, payload_len: int, tag_size: int) -> int:
    return HEADER.size + meta_len + payload_len + (tag_size if payload_len else 0) + tag_size


def parse_header(data) -> Header:
    """Check the fixed header (first HEADER.size bytes of ``data``); refuse what we do not know."""
    magic, version, type_code, flags, reserved, meta_len, payload_len, seq = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise LocalProtocolError(f"bad magic {magic!r}: not a migrator stream, or out of step")
    if version != FRAME_VERSION:
        raise LocalProtocolError(f"unsupported frame version {version} (this side speaks {FRAME_VERSION})")
    if type_code not in TYPES:
        raise LocalProtocolError(f"unknown frame type {type_code}")
    if flags & ~KNOWN_FLAGS:
        raise LocalProtocolError(f"unknown frame flags {flags:#04x}")
    if reserved:
        raise LocalProtocolError(f"reserved header byte is {reserved}, not 0")
    if payload_len and type_code != TYPE_CODES[Pages]:
        raise LocalProtocolError(f"{TYPES[type_code].__name__} frame carries a {payload_len}-byte payload")
    if flags & (F_ZSTD | F_ZEROS) and not payload_len:
        raise LocalProtocolError("compressed or zero-page flag on a frame without payload")
    return Header(type_code, flags, meta_len, payload_len, seq)


def assemble(type_code: int, flags: int, seq: int, meta: bytes, body, integrity: Integrity) -> bytes:
    """One frame's bytes; ``body`` is the payload exactly as it goes on the wire."""
    return b"".join(assemble_parts(type_code, flags, seq, meta, body, integrity))


def assemble_parts(type_code: int, flags: int, seq: int, meta: bytes, body, integrity: Integrity) -> tuple:
    """One frame as (header + meta, payload, tags): three buffers, so a megabyte payload need
    not be copied into one bytes object before it is written."""
    flags |= integrity.flag
    header = HEADER.pack(MAGIC, FRAME_VERSION, type_code, flags, 0, len(meta), len(body), seq)
    payload_tag = integrity.payload_tag(body) if len(body) else b""
    frame_tag = integrity.frame_tag(header, meta, payload_tag)
    return header + meta, body, payload_tag + frame_tag
