"""Every kind of bad input raises RemoteProtocolError with a message that says which."""

import msgpack
import pytest
import zstandard

from migrator.core.errors import RemoteProtocolError
from migrator.core.errors import LocalProtocolError
from migrator.core.model import Region
from migrator.protocol import Ack, Connection, Hello, Layout, Pages, Role, State, Zero
from migrator.protocol._frames import F_ZSTD, HEADER, Mac
from migrator.protocol._wire import encode_meta

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


def test_wrong_protocol_version_in_hello():
    d = Connection(D)
    fields = {"version": 9, "page_size": 4096, "features": [], "streams": 1, "auth": False, "recorded": False,
              "nonce": b"n" * 16, "session": b"", "stream": 0, "proof": b""}
    refuses(d, craft(Hello, fields, seq=0),
            "peer speaks protocol version 9; this side speaks 1")


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
    frame = bytearray(p.conn[D].send(Ack(of="x", ok=True)))
    frame[30] ^= 1
    refuses(p.conn[S], bytes(frame), "fails its MAC")


def test_receive_data_after_eof_is_misuse():
    conn = Connection(Role.DEST)
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        conn.receive_data(b"x")
