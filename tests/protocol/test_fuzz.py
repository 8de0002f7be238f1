"""Fuzz the decoder: 100,000+ random and mutated inputs; nothing but RemoteProtocolError escapes.

(About 11 s on the 2-vCPU CI machine; no timing is asserted here, benchmarks own timings.)

Blind mutations mostly stop at the checksum, so a third of the inputs are built behind it:
frames with valid tags around random or mutated metadata and payloads, which reach the
msgpack decoder, the field checks (some with exactly an event's fields, so that enum values and
field types are what is wrong), the state table, the bounds check and zstd.
"""

import random

import msgpack
import zstandard

from migrator.core.errors import RemoteProtocolError
from migrator.protocol import (
    NEED_DATA, ZERO_PAGES, Ack, Auth, Connection, ConnectionClosed, Digest, DigestKind, Fence, Freeze, Hello, Pages,
    PendingPages, RoundEnd, Zero,
)
from migrator.protocol._frames import F_ZEROS, F_ZSTD, TYPE_CODES, TYPES
from migrator.protocol._wire import FIELDS

from .helpers import LAYOUT, PS, D, S, craft

INPUTS = 100_000
BASE = LAYOUT.regions[0].start
DECOMPRESSOR = zstandard.ZstdDecompressor()


def _prefix_and_stream():
    """The source's opening frames (checksum mode: they do not depend on the destination's
    nonce) and a valid flow after them."""
    s = Connection(S)
    d = Connection(D)
    prefix = [s.send(Hello(streams=2))]
    d.receive_data(prefix[0])
    d.next_event()
    s.receive_data(d.send(Hello(features=(ZERO_PAGES,))))
    s.next_event()
    prefix += [s.send(Auth()), s.send(LAYOUT)]
    flow = [
        s.send(Pages(round=0, runs=((BASE, 2), (BASE + 8 * PS, 1)), payload=(b"text-like " * PS)[: 3 * PS])),
        s.send(Zero(round=0, runs=((BASE + 4 * PS, 3),))),
        s.send(Fence(frames=(2, 0))),
        s.send(RoundEnd(round=0, pages=6)),
        s.send(Freeze(round=1)),
        s.send(Pages(round=1, runs=((BASE, 1),), payload=random.Random(1).randbytes(PS))),
        s.send(Pages(round=1, runs=((BASE + 16 * PS, 4),), payload=bytes(PS) + b"t" * PS + bytes(2 * PS))),  # ZEROS
        s.send(RoundEnd(round=1, pages=6, final=True)),
        s.send(Digest(kind=DigestKind.PAGES, value=b"d" * 16, last=False)),
        s.send(Digest(kind=DigestKind.REGION, value=b"r" * 32)),
    ]
    return prefix[0], b"".join(prefix[1:]), flow, len(prefix)


HELLO, OPENING, FLOW, FIRST_SEQ = _prefix_and_stream()
STREAM = b"".join(FLOW)


def _fresh_dest(defer: bool) -> Connection:
    d = Connection(D, defer_payloads=defer)
    d.receive_data(HELLO)
    d.next_event()
    d.send(Hello())
    d.receive_data(OPENING)
    while d.next_event() is not NEED_DATA:
        pass
    return d


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(i, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[min(i, len(data) - 1)] = rng.randrange(256)
        elif op == 2:
            data[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del data[i : i + rng.randint(1, 16)]
        elif op == 4:
            data = data[:i]
        else:
            j = rng.randrange(len(data) + 1)
            data[i:i] = data[j : j + rng.randint(1, 64)]
    return bytes(data)


VALUES = [0, -1, 1 << 63, (1 << 64) - 1, 2.5, -0.5, float("nan"), float("inf"), "x", "", b"", b"\0" * 16, True, False,
          None, [], {}, [1, 2], {"a": 1}, {"check": 1.5}, {"check": 1}, "pages", "region", "layout", "round", "digest",
          "commit", "COMMIT", b"commit", BASE.to_bytes(8, "little") + (1).to_bytes(8, "little"), msgpack.ExtType(3, b"e")]


def _random_meta(rng: random.Random, code: int) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return rng.randbytes(rng.randint(0, 40))
    names = sorted({name for spec in FIELDS.values() for name, _ in spec})
    meta = {rng.choice(names): rng.choice(VALUES) for _ in range(rng.randint(0, 4))}
    if choice == 1:
        meta = {"round": rng.choice([0, 1, -1, "0"]), "runs": rng.choice(VALUES)}
    elif choice == 4:   # exactly the fields of the frame's type (or of a control event), any values
        kind = TYPES.get(code) if code in TYPES and rng.random() < 0.5 else rng.choice([RoundEnd, Digest, Ack])
        meta = {name: rng.choice(VALUES) for name, _ in FIELDS[kind]}
    packed = msgpack.packb(meta, use_bin_type=True)
    return _mutate(rng, packed) if choice == 3 else packed


def _crafted(rng: random.Random) -> bytes:
    """A frame with valid tags around random content, at the right sequence number."""
    code = rng.choice(list(TYPE_CODES.values()) + [0, 200])
    body, flags = b"", 0
    if code == TYPE_CODES[Pages] and rng.random() < 0.8:
        n = rng.randint(1, 3)
        meta = msgpack.packb({"round": 0, "runs": (BASE + rng.randrange(70) * PS).to_bytes(8, "little") + n.to_bytes(8, "little")})
        raw = rng.randbytes(n * PS) if rng.random() < 0.5 else bytes(n * PS)
        if rng.random() < 0.4:
            flags, body = F_ZSTD, zstandard.ZstdCompressor().compress(raw)
            body = _mutate(rng, body) if rng.random() < 0.5 else body
        elif rng.random() < 0.5:   # a zero-page bitmap, true or lying, before raw or compressed pages
            bitmap = rng.randbytes(rng.choice([1, 1, 1, 2]))
            kept = raw[: PS * rng.randint(0, n)]
            flags = F_ZEROS
            if rng.random() < 0.5:
                flags, kept = F_ZEROS | F_ZSTD, zstandard.ZstdCompressor().compress(kept)
            body = bitmap + kept
            body = _mutate(rng, body) if rng.random() < 0.3 else body
        else:
            body = raw if rng.random() < 0.7 else raw[: rng.randrange(len(raw))]
    else:
        meta = _random_meta(rng, code)
        if rng.random() < 0.1:
            body = rng.randbytes(rng.randint(1, 64))
    return craft(code, meta, seq=FIRST_SEQ + rng.choice([0, 0, 0, 1, -1]), body=body, flags=flags)


def _feed(conn: Connection, data: bytes, rng: random.Random) -> None:
    """Feed ``data`` in up to three pieces; where a frame's header is in, sometimes gather the
    rest of that frame into a buffer of its own, as a socket transport does."""
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 2)))
    start = 0
    gather = rng.random() < 0.3
    rest = None     # the unfilled part of a frame being gathered
    try:
        for cut in [*cuts, len(data)]:
            while True:
                if rest is not None and start < cut:
                    n = min(len(rest), cut - start)
                    rest[:n] = data[start : start + n]
                    conn.gathered(n)
                    rest = rest[n:] or None
                    start += n
                event = conn.next_event()
                if event is NEED_DATA:
                    if start >= cut:
                        break
                    if rest is None and gather and conn.incomplete_frame():
                        rest = conn.gather_frame(bytearray(conn.incomplete_frame()))
                    elif rest is None:
                        conn.receive_data(data[start:cut])
                        start = cut
                    continue
                if type(event) is ConnectionClosed:
                    break
                if type(event) is PendingPages:
                    event.decode(DECOMPRESSOR)
        if rng.random() < 0.3:
            conn.receive_data(b"")
            while type(conn.next_event()) is not ConnectionClosed:
                pass
    except RemoteProtocolError:
        return


def test_decoder_survives_100000_random_and_mutated_inputs():
    rng = random.Random(20240607)
    counts = {"random": 0, "mutated": 0, "crafted": 0}
    for i in range(INPUTS):
        kind = ("random", "mutated", "crafted")[i % 3]
        counts[kind] += 1
        if kind == "random":
            conn = Connection(D) if rng.random() < 0.5 else _fresh_dest(False)
            data = rng.randbytes(rng.randint(0, 120))
            if rng.random() < 0.5:
                data = b"MGRT\x01" + data
        elif kind == "mutated":
            conn = _fresh_dest(rng.random() < 0.5)
            data = _mutate(rng, STREAM)
        else:
            conn = _fresh_dest(rng.random() < 0.5)
            data = _crafted(rng)
        _feed(conn, data, rng)
    assert sum(counts.values()) >= 100_000 and min(counts.values()) > 30_000


def test_fuzz_corpus_is_valid_before_mutation():
    conn = _fresh_dest(False)
    conn.receive_data(STREAM)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(type(event).__name__)
    assert events == ["Pages", "Zero", "Fence", "RoundEnd", "Freeze", "Pages", "Pages", "RoundEnd", "Digest", "Digest"]
    assert FLOW[6][5] & F_ZEROS    # the header's flags byte: the zero pages were left out
