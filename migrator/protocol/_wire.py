"""Event fields <-> the msgpack metadata of a frame.

Each event type lists its fields and their wire kind. Bulk fields (runs, regions, index entries)
travel as packed little-endian integers in one msgpack ``bin``, so decoding thousands of runs is a
few C-level passes rather than a Python loop per run. Enums travel as their string values and
durations as msgpack floats. Decoding accepts exactly the listed fields with exactly the listed
msgpack types, and only the values an enum defines; the event constructors then check the values.
Every refusal names the event and the field.
"""

from __future__ import annotations

import array
import enum
import struct
import sys
from itertools import chain

import msgpack

from ..core.errors import LocalProtocolError
from ..core.model import Region
from ..core.runs import Runs
from ._frames import TYPE_CODES, TYPES
from .events import (
    Abort, Ack, Acked, Auth, Commit, Digest, DigestKind, Discard, Event, Fence, Freeze, Hello, Index, IndexEntry, Lacking,
    Layout, Pages, Request, Resume, RoundEnd, Switch, Zero,
)

_ENTRY = struct.Struct("<QIIIB")   # offset, length, round, pages, type code


def _pack_pairs(pairs) -> bytes:
    packed = pairs.packed if type(pairs) is Runs else array.array("Q", chain.from_iterable(pairs))
    if sys.byteorder == "big":
        packed = array.array("Q", packed)
        packed.byteswap()
    return packed.tobytes()


def _unpack_pairs(data: bytes) -> Runs:
    """Pairs off the wire, as ``Runs`` whose words are the ones received (no packing again)."""
    if len(data) % 16:
        raise LocalProtocolError(f"{len(data)} bytes is not a whole number of 16-byte pairs")
    values = array.array("Q")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return Runs.from_words(values)


def _pack_entries(entries: tuple[IndexEntry, ...]) -> bytes:
    codes = {kind.__name__: code for kind, code in TYPE_CODES.items()}
    return b"".join(_ENTRY.pack(e.offset, e.length, e.round, e.pages, codes[e.kind]) for e in entries)


def _unpack_entries(data: bytes) -> tuple[IndexEntry, ...]:
    if len(data) % _ENTRY.size:
        raise LocalProtocolError(f"{len(data)} bytes is not a whole number of {_ENTRY.size}-byte entries")
    entries = []
    for offset, length, round_, pages, code in _ENTRY.iter_unpack(data):
        if code not in TYPES:
            raise LocalProtocolError(f"unknown frame type {code}")
        entries.append(IndexEntry(offset=offset, length=length, kind=TYPES[code].__name__, round=round_, pages=pages))
    return tuple(entries)


def _enum_kind(kind: type[enum.Enum]) -> tuple:
    values = {member.value: member for member in kind}
    known = ", ".join(values)

    def from_wire(value: str) -> enum.Enum:
        member = values.get(value)
        if member is None:
            raise LocalProtocolError(f"unknown value {value[:64]!r}, expected one of {known}")
        return member

    return str, lambda member: member.value, from_wire


def _timings_from_wire(value: dict) -> dict:
    for key, item in value.items():
        if type(item) is not float:
            raise LocalProtocolError(f"{key!r}: {type(item).__name__} on the wire, expected float")
    return value


# wire kind -> (msgpack type expected, to-wire, from-wire); from-wire raises LocalProtocolError
# with a message that decode_fields prefixes with the event and field name
_KINDS = {
    "int": (int, None, None),
    "bool": (bool, None, None),
    "str": (str, None, None),
    "bytes": (bytes, None, None),
    "float": (float, None, None),
    "strs": (list, list, tuple),
    "ints": (list, list, tuple),
    "scalars": (dict, dict, None),
    "timings": (dict, dict, _timings_from_wire),
    "acked": _enum_kind(Acked),
    "digest_kind": _enum_kind(DigestKind),
    "runs": (bytes, _pack_pairs, _unpack_pairs),
    "regions": (
        bytes,
        lambda regions: _pack_pairs((r.start, r.length) for r in regions),
        lambda data: tuple(Region(start, length) for start, length in _unpack_pairs(data)),
    ),
    "entries": (bytes, _pack_entries, _unpack_entries),
}

FIELDS: dict[type[Event], tuple[tuple[str, str], ...]] = {
    Hello: (
        ("version", "int"), ("page_size", "int"), ("features", "strs"), ("streams", "int"),
        ("auth", "bool"), ("recorded", "bool"), ("nonce", "bytes"), ("session", "bytes"),
        ("stream", "int"), ("proof", "bytes"),
    ),
    Auth: (("proof", "bytes"),),
    Layout: (("regions", "regions"), ("page_size", "int"), ("meta", "scalars")),
    Pages: (("round", "int"), ("runs", "runs")),     # the payload travels after the metadata
    Zero: (("round", "int"), ("runs", "runs")),
    RoundEnd: (("round", "int"), ("pages", "int"), ("final", "bool")),
    Freeze: (("round", "int"),),
    Digest: (("kind", "digest_kind"), ("value", "bytes"), ("last", "bool")),
    Commit: (),
    Ack: (
        ("of", "acked"), ("ok", "bool"), ("reason", "str"), ("round", "int"), ("ready_ms", "float"),
        ("timings_ms", "timings"),
    ),
    Abort: (("reason", "str"),),
    Fence: (("frames", "ints"),),
    Index: (("entries", "entries"),),
    Discard: (("round", "int"), ("runs", "runs")),
    Switch: (("round", "int"), ("pages", "int")),
    Request: (("runs", "runs"),),
    Resume: (("migration", "str"),),
    Lacking: (("runs", "runs"),),
}


def encode_meta(event: Event) -> bytes:
    fields = {}
    for name, kind in FIELDS[type(event)]:
        to_wire = _KINDS[kind][1]
        value = getattr(event, name)
        fields[name] = to_wire(value) if to_wire else value
    return msgpack.packb(fields, use_bin_type=True)


def _refuse_ext(code: int, data: bytes):
    raise LocalProtocolError(f"msgpack extension type {code} is not allowed")


def decode_fields(kind: type[Event], meta: bytes) -> dict:
    """The constructor arguments of a ``kind`` event (Pages: without the payload)."""
    name = kind.__name__
    try:
        fields = msgpack.unpackb(meta, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except LocalProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise LocalProtocolError(f"{name}: metadata is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if type(fields) is not dict:
        raise LocalProtocolError(f"{name}: metadata is a {type(fields).__name__}, not a map")
    spec = FIELDS[kind]
    expected = {field for field, _ in spec}
    if fields.keys() != expected:
        missing = sorted(expected - fields.keys())
        extra = sorted(map(str, fields.keys() - expected))
        raise LocalProtocolError(f"{name}: metadata fields missing {missing}, unexpected {extra}")
    args = {}
    for field, wire_kind in spec:
        wire_type, _, from_wire = _KINDS[wire_kind]
        value = fields[field]
        if type(value) is not wire_type:
            raise LocalProtocolError(f"{name}.{field}: {type(value).__name__} on the wire, expected {wire_type.__name__}")
        if from_wire is not None:
            try:
                value = from_wire(value)
            except LocalProtocolError as exc:
                raise LocalProtocolError(f"{name}.{field}: {exc}") from None
        args[field] = value
    return args


def hello_version(meta: bytes) -> int | None:
    """The ``version`` of a Hello's metadata, read before anything else of it: a peer of another
    protocol version may send a Hello of other fields, and is told about the version, not them."""
    try:
        fields = msgpack.unpackb(meta, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except (LocalProtocolError, ValueError, TypeError, msgpack.UnpackException):
        return None
    version = fields.get("version") if type(fields) is dict else None
    return version if type(version) is int else None
