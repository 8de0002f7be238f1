"""Event fields <-> the msgpack metadata of a frame.

Each event type lists its fields and their wire kind. Bulk fields (runs, regions, index entries)
travel as packed little-endian integers in one msgpack ``bin``, so decoding thousands of runs is a
few C-level passes rather than a Python loop per run. Decoding accepts exactly the listed fields
with exactly the listed msgpack types; the event constructors then check the values.
"""

from __future__ import annotations

import array
import struct
import sys
from itertools import chain

import msgpack

from ..core.errors import LocalProtocolError
from ..core.model import Region
from ._frames import TYPE_CODES, TYPES
from .events import (
    Abort, Ack, Auth, Commit, Digest, Event, Fence, Freeze, Hello, Index, IndexEntry, Layout, Pages,
    RoundEnd, Zero,
)

_ENTRY = struct.Struct("<QIIIB")   # offset, length, round, pages, type code


def _pack_pairs(pairs) -> bytes:
    packed = array.array("Q", chain.from_iterable(pairs))
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _unpack_pairs(name: str, data: bytes) -> tuple[tuple[int, int], ...]:
    if len(data) % 16:
        raise LocalProtocolError(f"{name}: {len(data)} bytes is not a whole number of 16-byte pairs")
    values = array.array("Q")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return tuple(zip(values[0::2], values[1::2]))


def _pack_entries(entries: tuple[IndexEntry, ...]) -> bytes:
    codes = {kind.__name__: code for kind, code in TYPE_CODES.items()}
    return b"".join(_ENTRY.pack(e.offset, e.length, e.round, e.pages, codes[e.kind]) for e in entries)


def _unpack_entries(data: bytes) -> tuple[IndexEntry, ...]:
    if len(data) % _ENTRY.size:
        raise LocalProtocolError(f"entries: {len(data)} bytes is not a whole number of {_ENTRY.size}-byte entries")
    entries = []
    for offset, length, round_, pages, code in _ENTRY.iter_unpack(data):
        if code not in TYPES:
            raise LocalProtocolError(f"entries: unknown frame type {code}")
        entries.append(IndexEntry(offset=offset, length=length, kind=TYPES[code].__name__, round=round_, pages=pages))
    return tuple(entries)


# wire kind -> (msgpack type expected, to-wire, from-wire)
_KINDS = {
    "int": (int, None, None),
    "bool": (bool, None, None),
    "str": (str, None, None),
    "bytes": (bytes, None, None),
    "strs": (list, list, tuple),
    "ints": (list, list, tuple),
    "scalars": (dict, dict, None),
    "runs": (bytes, _pack_pairs, lambda data: _unpack_pairs("runs", data)),
    "regions": (
        bytes,
        lambda regions: _pack_pairs((r.start, r.length) for r in regions),
        lambda data: tuple(Region(start, length) for start, length in _unpack_pairs("regions", data)),
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
    RoundEnd: (("round", "int"), ("stats", "scalars")),
    Freeze: (("round", "int"),),
    Digest: (("kind", "str"), ("value", "bytes"), ("stats", "scalars")),
    Commit: (),
    Ack: (("of", "str"), ("ok", "bool"), ("detail", "scalars")),
    Abort: (("reason", "str"),),
    Fence: (("frames", "ints"),),
    Index: (("entries", "entries"),),
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
        args[field] = from_wire(value) if from_wire else value
    return args
