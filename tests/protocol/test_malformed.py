"""Every kind of bad input raises RemoteProtocolError with a message that says which."""

import msgpack
import pytest
import zstandard

from migrator.core.errors import RemoteProtocolError
from migrator.core.errors import LocalProtocolError
from migrator.core.model import Region
from migrator.protocol import (
    CHECKSUM_FRAMES, PROTOCOL_VERSION, Ack, Auth, Acked, Connection, Digest, DigestKind, Hello, Layout, Pages, Role, RoundEnd, State, Zero,
)
from migrator.protocol._frames import F_ZSTD, HEADER, Mac
from migrator.protocol._wire import decode_fields, encode_meta

from .helpers import LAYOUT, PS, TOKEN, D, S, ConnectionPair, craft, drain

BASE = LAYOUT.regions[0].start
PAGES = Pages(round=0, runs=((BASE, 2),), payload=b"ab" * PS)


def opened(token=None, **kwargs) -> ConnectionPair:
    p = ConnectionPair(token=token, **kwargs)
    p.open()
    return p


def refuses(conn: Connection, data: bytes, words: str, *, eof: bool = False) -> RemoteProtocolError:
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=words) as info:
        drain(conn)
    assert conn.state is State.ERROR
    return info.value


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size, HEADER.size + 5, -1])
def test_truncated_frame(cut):
    p = opened()
    frame = p.conn[S].send(PAGES)
    refuses(p.conn[D], frame[:cut], "truncated frame at byte", eof=True)


def test_oversized_frame_is_refused_from_its_header():
    p = ConnectionPair()
    p.conn[D] = Connection(D, max_frame=1 << 20)
    p.open()
    header = HEADER.pack(b"MGRT", 1, 4, 0, 0, 10, 2 << 20, 3)
    refuses(p.conn[D], header, "oversized frame at byte .*: 2097202 bytes, max_frame is 1048576")


def test_large_frames_are_refused_before_authentication():
    d = Connection(D)
    header = HEADER.pack(b"MGRT", 1, 1, 0, 0, 100 << 10, 0, 0)
    refuses(d, header, "oversized frame")


@pytest.mark.parametrize("where", ["header", "meta", "payload", "tag"])
def test_corrupted_frame_fails_its_checksum(where):
    p = opened()
    frame = bytearray(p.conn[S].send(PAGES))
    index = {"header": 21, "meta": HEADER.size + 2, "payload": HEADER.size + 40, "tag": len(frame) - 1}[where]
    frame[index] ^= 0x10
    refuses(p.conn[D], bytes(frame), "fails its checksum|payload of frame .* fails its checksum|oversized|truncated")


def test_corrupted_payload_is_caught_by_the_payload_checksum():
    p = opened(compress="none")
    frame = bytearray(p.conn[S].send(PAGES))
    frame[HEADER.size + 60] ^= 1
    refuses(p.conn[D], bytes(frame), "payload of frame seq 3 at byte .* fails its checksum")


def test_wrong_frame_version_magic_type_flags_and_reserved_byte():
    cases = [
        ({"version": 2}, "unsupported frame version 2"),
        ({"magic": b"HTTP"}, "bad magic"),
        ({"reserved": 7}, "reserved header byte is 7"),
        ({"flags": 0x80}, "unknown frame flags 0x80"),
    ]
    for kwargs, words in cases:
        p = opened()
        refuses(p.conn[D], craft(Zero, encode_meta(Zero(round=0, runs=((BASE, 1),))), seq=3, **kwargs), words)
    p = opened()
    refuses(p.conn[D], craft(99, b"\x80", seq=3), "unknown frame type 99")


HELLO_FIELDS = {"version": 1, "page_size": 4096, "features": [], "streams": 1, "auth": False, "recorded": False,
                "nonce": b"n" * 16, "session": b"", "stream": 0, "proof": b""}


@pytest.mark.parametrize("fields", [
    HELLO_FIELDS,                                       # a version-1 source: the same Hello fields
    dict(HELLO_FIELDS, version=9, extra=[1, 2]),        # a newer one, whose Hello has other fields
    {"version": 0},
])
def test_a_hello_of_another_protocol_version_is_refused_by_its_version(fields):
    version = fields["version"]
    error = refuses(Connection(D), craft(Hello, fields, seq=0),
                    f"peer speaks protocol version {version}; this side speaks {PROTOCOL_VERSION}")
    assert "\n" not in str(error)
    s = Connection(S)
    s.send(Hello())
    s.receive_data(craft(Hello, dict(fields, nonce=b"n" * 16, session=b"s" * 16), seq=0))
    with pytest.raises(RemoteProtocolError, match=f"peer speaks protocol version {version}; this side speaks 2"):
        drain(s)


def test_a_destination_answers_another_version_with_its_own_hello():
    """What lets an older source say what is wrong: it checks a Hello's version first, so the
    destination's refusal is a Hello of protocol version 2 and nothing more (no proof, even with
    a token)."""
    d = Connection(D, token=TOKEN)
    refuses(d, craft(Hello, dict(HELLO_FIELDS, auth=True), seq=0), "peer speaks protocol version 1")
    refusal = d.version_refusal()
    header = HEADER.unpack_from(refusal)
    assert header[2] == 1 and header[7] == 0           # a Hello, sequence number 0
    meta = refusal[HEADER.size : HEADER.size + header[5]]
    fields = decode_fields(Hello, meta)
    assert fields["version"] == PROTOCOL_VERSION == 2 and fields["proof"] == b"" and len(fields["nonce"]) == 16
    # a version-2 source in its place would read it as a valid Hello: the frame and its checksum hold
    s = Connection(S)
    s.send(Hello())
    s.receive_data(refusal)
    assert drain(s)[0].version == 2
    assert Connection(D).version_refusal() == b""      # nothing refused, nothing to send
    good = Connection(D)
    good.receive_data(Connection(S).send(Hello()))
    drain(good)
    assert good.version_refusal() == b""


def test_an_image_of_another_protocol_version_is_refused_by_its_version():
    reader = Connection(D, recorded=True)
    error = refuses(reader, craft(Hello, dict(HELLO_FIELDS, recorded=True), seq=0),
                    "the image was recorded with protocol version 1; this migrator reads version 2 only")
    assert "\n" not in str(error) and reader.version_refusal() == b""


def test_layout_page_size_must_match_the_hello():
    p = ConnectionPair()
    p.handshake()                      # the source's Hello says 4096
    layout = Layout(regions=(Region(BASE, 4 * 16384),), page_size=16384, meta={})
    refuses(p.conn[D], craft(Layout, encode_meta(layout), seq=2),
            "Layout.page_size 16384 differs from the source's Hello.page_size 4096")
    p = ConnectionPair()
    p.handshake()
    with pytest.raises(LocalProtocolError, match="Layout.page_size 16384 differs"):
        p.conn[S].send(layout)


@pytest.mark.parametrize("token", [TOKEN])
def test_wrong_mac(token):
    p = opened(token)
    frame = bytearray(p.conn[S].send(PAGES))
    frame[-3] ^= 0x01
    refuses(p.conn[D], bytes(frame), "frame at byte .* fails its MAC")


def test_forged_frame_under_another_key_and_unauthenticated_frame():
    p = opened(TOKEN)
    forged = craft(Zero, encode_meta(Zero(round=0, runs=((BASE, 1),))), seq=3, integrity=Mac(b"k" * 32, b"k" * 32))
    refuses(p.conn[D], forged, "fails its MAC")
    p = opened(TOKEN)
    plain = craft(Zero, encode_meta(Zero(round=0, runs=((BASE, 1),))), seq=3)
    refuses(p.conn[D], plain, "has no MAC in an authenticated session")


def test_forged_payload_under_a_valid_frame_mac_is_caught():
    p = opened(TOKEN)
    keys = p.conn[S]._keys.source_to_dest
    frame = bytearray(p.conn[S].send(PAGES))
    # replace the payload tag and recompute the frame MAC over it: the payload MAC still fails
    header, meta_len = bytes(frame[: HEADER.size]), HEADER.unpack_from(frame)[5]
    meta = bytes(frame[HEADER.size : HEADER.size + meta_len])
    body = bytes(frame[HEADER.size + meta_len : -32])
    bad_tag = b"\0" * 16
    forged = header + meta + body + bad_tag + keys.frame_tag(header, meta, bad_tag)
    refuses(p.conn[D], forged, "payload of frame seq 3 .* fails its MAC")


@pytest.mark.parametrize("token", [None, TOKEN])
def test_replayed_frame(token):
    p = opened(token)
    first = p.conn[S].send(PAGES)
    p.conn[D].receive_data(first)
    drain(p.conn[D])
    refuses(p.conn[D], first, "replayed frame at byte .*: seq 3 was already received \\(expected 4\\)")


@pytest.mark.parametrize("token", [None, TOKEN])
def test_out_of_order_frames(token):
    p = opened(token)
    first = p.conn[S].send(PAGES)
    second = p.conn[S].send(PAGES)
    refuses(p.conn[D], second + first, "out-of-order frame at byte .*: seq 4, expected 3")


@pytest.mark.parametrize(
    "meta, words",
    [
        (b"\xc1", "metadata is not valid msgpack"),
        (msgpack.packb([1, 2]), "metadata is a list, not a map"),
        (msgpack.packb({"round": 0}), r"metadata fields missing \['runs'\]"),
        (msgpack.packb({"round": 0, "runs": b"", "extra": 1}), r"unexpected \['extra'\]"),
        (msgpack.packb({"round": "0", "runs": b"\0" * 16}), "Zero.round: str on the wire, expected int"),
        (msgpack.packb({"round": 0, "runs": b"\0" * 15}), "not a whole number of 16-byte pairs"),
        (msgpack.packb({"round": 0, "runs": b""}), "Zero.runs: must not be empty"),
        (msgpack.packb({"round": 0, "runs": msgpack.ExtType(5, b"x")}), "extension type 5 is not allowed"),
        (msgpack.packb({"round": 0, "runs": (BASE).to_bytes(8, "little") + (0).to_bytes(8, "little")}), "page counts"),
    ],
)
def test_malformed_metadata(meta, words):
    p = opened()
    refuses(p.conn[D], craft(Zero, meta, seq=3), words)


@pytest.mark.parametrize(
    "kind, fields, words",
    [
        (RoundEnd, {"round": 0, "pages": 1, "final": 1}, "RoundEnd.final: int on the wire, expected bool"),
        (RoundEnd, {"round": 0, "pages": "1", "final": False}, "RoundEnd.pages: str on the wire, expected int"),
        (RoundEnd, {"round": 0, "pages": -1, "final": False}, "RoundEnd.pages: -1 is outside"),
        (RoundEnd, {"round": 0, "stats": {"final": True}},     # a version-1 RoundEnd
         r"RoundEnd: metadata fields missing \['final', 'pages'\], unexpected \['stats'\]"),
        (Digest, {"kind": "bogus", "value": b"v", "last": True},
         "Digest.kind: unknown value 'bogus', expected one of pages, region"),
        (Digest, {"kind": "PAGES", "value": b"v", "last": True}, "Digest.kind: unknown value 'PAGES'"),
        (Digest, {"kind": "x" * 5000, "value": b"v", "last": True}, "Digest.kind: unknown value 'x{64}', expected"),
        (Digest, {"kind": 1, "value": b"v", "last": True}, "Digest.kind: int on the wire, expected str"),
        (Digest, {"kind": b"pages", "value": b"v", "last": True}, "Digest.kind: bytes on the wire, expected str"),
        (Digest, {"kind": "pages", "value": b"v", "last": None}, "Digest.last: NoneType on the wire, expected bool"),
    ],
)
def test_malformed_control_fields_from_the_source(kind, fields, words):
    p = opened()
    refuses(p.conn[D], craft(kind, fields, seq=3), words)


ACK = {"of": "round", "ok": True, "reason": "", "round": 0, "ready_ms": 0.0, "timings_ms": {}}


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(ACK, of="commited"), "Ack.of: unknown value 'commited', expected one of layout, round, digest, commit"),
        (dict(ACK, of=None), "Ack.of: NoneType on the wire, expected str"),
        (dict(ACK, ok="yes"), "Ack.ok: str on the wire, expected bool"),
        (dict(ACK, reason=7), "Ack.reason: int on the wire, expected str"),
        (dict(ACK, round=2.0), "Ack.round: float on the wire, expected int"),
        (dict(ACK, of="layout", ready_ms=1), "Ack.ready_ms: int on the wire, expected float"),
        (dict(ACK, of="layout", ready_ms=-1.0), "Ack.ready_ms: -1.0 is not a finite number"),
        (dict(ACK, of="layout", ready_ms=float("inf")), "Ack.ready_ms: inf is not a finite number"),
        (dict(ACK, timings_ms={"check": 1}), "Ack.timings_ms: 'check': int on the wire, expected float"),
        (dict(ACK, timings_ms={"check": None}), "Ack.timings_ms: 'check': NoneType on the wire, expected float"),
        (dict(ACK, timings_ms={b"check": 1.0}), "Ack.timings_ms: key b'check' is not a non-empty str"),
        (dict(ACK, timings_ms={"check": float("nan")}), r"Ack.timings_ms\['check'\]: nan is not a finite number"),
        (dict(ACK, timings_ms=[1.0]), "Ack.timings_ms: list on the wire, expected dict"),
        (dict(ACK, reason="but"), "Ack.reason: given on an Ack that is ok"),
        (dict(ACK, of="digest", round=2), "Ack.round: set on an Ack of digest"),
        (dict(ACK, ready_ms=3.0), "Ack.ready_ms: set on an Ack of round"),
        ({"of": "digest", "ok": False, "detail": {"reason": "x"}},      # a version-1 Ack
         r"Ack: metadata fields missing \['ready_ms', 'reason', 'round', 'timings_ms'\], unexpected \['detail'\]"),
    ],
)
def test_malformed_ack_fields_from_the_destination(fields, words):
    p = opened()
    error = refuses(p.conn[S], craft(Ack, fields, seq=1), words)
    assert "\n" not in str(error)


def test_a_wellformed_ack_is_taken_with_its_typed_fields():
    p = opened()
    p.conn[S].receive_data(craft(Ack, dict(ACK, of="digest", ok=False, reason="differs", timings_ms={"check": 2.5}), seq=1))
    assert drain(p.conn[S]) == [Ack(of=Acked.DIGEST, ok=False, reason="differs", timings_ms={"check": 2.5})]
    p = opened()
    p.conn[D].receive_data(craft(Digest, {"kind": "region", "value": b"v", "last": False}, seq=3))
    assert drain(p.conn[D]) == [Digest(kind=DigestKind.REGION, value=b"v", last=False)]


def test_run_outside_layout_names_the_run():
    p = opened()
    end = LAYOUT.regions[1].end
    bad = Zero(round=0, runs=((BASE, 1), (end, 3)))
    refuses(p.conn[D], craft(Zero, encode_meta(bad), seq=3), f"page run {end:#x} \\+3 outside layout")
    p = opened()
    gap = LAYOUT.regions[0].end
    refuses(p.conn[D], craft(Zero, encode_meta(Zero(round=0, runs=((gap, 1),))), seq=3), "outside layout")


def test_payload_size_and_compression_lies():
    meta = encode_meta(PAGES)
    p = opened()
    refuses(p.conn[D], craft(Pages, meta, seq=3, body=b"x" * PS), "raw payload of 4096 bytes, the runs need 8192")
    p = opened()
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * PS))
    refuses(p.conn[D], craft(Pages, meta, seq=3, body=bomb, flags=F_ZSTD), "declares 262144 bytes, the runs need 8192")
    p = opened()
    refuses(p.conn[D], craft(Pages, meta, seq=3, body=b"not zstd at all", flags=F_ZSTD), "no valid zstd frame header")
    p = opened()
    liar = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(2 * PS))
    refuses(p.conn[D], craft(Pages, meta, seq=3, body=liar, flags=F_ZSTD), "declares -1 bytes")
    p = opened()
    refuses(p.conn[D], craft(Zero, encode_meta(Zero(round=0, runs=((BASE, 1),))), seq=3, body=b"xx"), "carries a 2-byte payload")


def test_deferred_payload_errors_are_remote_too():
    p = opened(compress="none", defer_payloads=True)
    frame = bytearray(p.conn[S].send(PAGES))
    frame[HEADER.size + 50] ^= 4
    p.conn[D].receive_data(bytes(frame))
    pending = p.conn[D].next_event()
    with pytest.raises(RemoteProtocolError, match="payload of frame seq 3 at byte .* fails its checksum"):
        pending.decode(zstandard.ZstdDecompressor())


def test_source_side_refuses_bad_destination_frames_too():
    p = opened(TOKEN)
    frame = bytearray(p.conn[D].send(Ack(of=Acked.ROUND, ok=True)))
    frame[30] ^= 1
    refuses(p.conn[S], bytes(frame), "fails its MAC")


def test_receive_data_after_eof_is_misuse():
    conn = Connection(Role.DEST)
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        conn.receive_data(b"x")


def checksum_session(source_features, dest_features, compress: str = "zstd:1") -> ConnectionPair:
    p = ConnectionPair(token=TOKEN, compress=compress)
    p.send(S, Hello(features=source_features), expect=...)
    p.send(D, Hello(features=dest_features), expect=...)
    p.send(S, Auth(), expect=...)
    p.send(S, LAYOUT)
    return p


def test_frames_carry_checksums_only_when_both_ends_say_their_link_needs_no_mac():
    both = checksum_session((CHECKSUM_FRAMES,), (CHECKSUM_FRAMES,))
    assert all(c.authenticated and not c.frame_macs for c in both.conn.values())
    both.send(S, PAGES)                               # pages flow, under xxh3 tags of headers and meta
    frame = bytearray(both.conn[S].send(PAGES))
    assert frame[-16:-8] == bytes(8), "the payload tag is left zero: the link cannot corrupt a payload"
    frame[-3] ^= 0x01
    refuses(both.conn[D], bytes(frame), "fails its checksum")   # corruption is still caught
    frame = bytearray(both.conn[S].send(PAGES))
    frame[HEADER.size + 1] ^= 0x01                    # the meta (the runs): still under the frame tag
    refuses(checksum_session((CHECKSUM_FRAMES,), (CHECKSUM_FRAMES,)).conn[D], bytes(frame), "fails its checksum")
    assert not both.conn[S].payloads_may_change, "a compressed payload must hold still while it is compressed"
    assert checksum_session((CHECKSUM_FRAMES,), (CHECKSUM_FRAMES,), "none").conn[S].payloads_may_change, \
        "untagged, uncompressed payloads may be live memory"
    for source, dest in (((CHECKSUM_FRAMES,), ()), ((), (CHECKSUM_FRAMES,)), ((), ())):
        one = checksum_session(source, dest)
        assert all(c.authenticated and c.frame_macs for c in one.conn.values())
        assert not checksum_session(source, dest, "none").conn[S].payloads_may_change, \
            "a payload under a MAC must be the bytes it hashed"
    assert not Connection(Role.SOURCE).payloads_may_change, "nor under a checksum (no session yet)"


def test_the_feature_cannot_be_added_on_the_way():
    """The Hellos are in the handshake's transcript: a destination Hello that gained
    CHECKSUM_FRAMES in transit fails the source's check of the destination's proof."""
    p = ConnectionPair(token=TOKEN)
    p.send(S, Hello(features=(CHECKSUM_FRAMES,)), expect=...)
    hello = p.conn[D].send(Hello(features=()))
    meta_len = HEADER.unpack_from(hello)[5]
    fields = msgpack.unpackb(hello[HEADER.size : HEADER.size + meta_len], raw=False)
    assert "features" in fields
    fields["features"] = [CHECKSUM_FRAMES]
    refuses(p.conn[S], craft(Hello, fields, seq=0), "the destination does not know the token")


def test_a_recorded_stream_always_carries_macs():
    image = Connection(Role.SOURCE, token=TOKEN, recorded=True)
    image.send(Hello(features=(CHECKSUM_FRAMES,)))
    assert image.frame_macs
