"""Placing a raw Pages payload straight into the transport's views: each run's bytes in its own place."""

import os

import pytest
import zstandard

from migrator.core.errors import LocalProtocolError, RemoteProtocolError
from migrator.protocol import NEED_DATA, IncomingPages, Pages, PendingPages, PlacedPages, RoundEnd, State
from migrator.protocol._frames import HEADER
from migrator.protocol._wire import encode_meta

from .helpers import LAYOUT, PS, TOKEN, D, S, ConnectionPair, craft, drain

BASE = LAYOUT.regions[0].start
RUNS = ((BASE, 3), (BASE + 10 * PS, 5))
PAYLOAD = os.urandom(8 * PS)


def opened(**kwargs) -> ConnectionPair:
    p = ConnectionPair(**kwargs)
    p.open()
    return p


def place(conn, frame: bytes, head: int, owner=None, pieces: int = 3) -> list[bytearray]:
    """Feed ``head`` bytes, place the payload into one buffer per run, feed the rest in
    ``pieces`` parts as a socket would; returns the run buffers."""
    conn.receive_data(frame[:head])
    assert conn.next_event() is NEED_DATA
    assert conn.frame_head_missing() == 0
    incoming = conn.incoming_pages()
    assert incoming == IncomingPages(round=0, runs=RUNS, payload_len=len(PAYLOAD))
    places = [bytearray(count * PS) for _, count in RUNS]
    views = conn.place_frame([memoryview(b) for b in places], owner)
    assert conn.incomplete_frame() == 0
    rest = frame[len(frame) - sum(v.nbytes for v in views):]
    cuts = [len(rest) * i // pieces for i in range(pieces + 1)]
    for start, end in zip(cuts, cuts[1:]):
        assert conn.next_event() is NEED_DATA
        data = memoryview(rest)[start:end]
        while data.nbytes:
            view = views[0]
            n = min(view.nbytes, data.nbytes)
            view[:n] = data[:n]
            conn.gathered(n)
            views = [view[n:]] + views[1:] if n < view.nbytes else views[1:]
            data = data[n:]
    return places


@pytest.mark.parametrize("head", [None, HEADER.size + 5000])
@pytest.mark.parametrize("token", [None, TOKEN])
@pytest.mark.parametrize("defer", [False, True])
def test_a_placed_payload_lands_in_the_runs_places(head, token, defer):
    p = opened(token=token, compress="none", defer_payloads=defer)
    frame = p.conn[S].send(Pages(round=0, runs=RUNS, payload=PAYLOAD))
    meta_end = len(frame) - len(PAYLOAD) - 2 * (16 if token else 8)
    owner = object()
    places = place(p.conn[D], frame, head or meta_end, owner)
    [event] = drain(p.conn[D])
    if defer:
        assert type(event) is PendingPages
        event = event.decode(zstandard.ZstdDecompressor())
    assert event == PlacedPages(round=0, runs=RUNS, owner=owner)
    assert b"".join(places) == PAYLOAD


def test_frames_after_a_placed_one_are_fed_as_usual():
    p = opened(compress="none")
    frame = p.conn[S].send(Pages(round=0, runs=RUNS, payload=PAYLOAD))
    more = p.conn[S].send(RoundEnd(round=0))
    place(p.conn[D], frame, len(frame) - len(PAYLOAD) - 16)
    p.conn[D].receive_data(more)
    events = drain(p.conn[D])
    assert [type(e) for e in events] == [PlacedPages, RoundEnd]


def test_only_raw_pages_frames_with_their_meta_in_are_placed():
    p = opened()     # zstd: compressible pages are compressed
    text = (b"compressible " * PS)[: 8 * PS]
    frame = p.conn[S].send(Pages(round=0, runs=RUNS, payload=text))
    d = p.conn[D]
    d.receive_data(frame[:HEADER.size])
    assert d.next_event() is NEED_DATA and d.frame_head_missing() > 0
    assert d.incoming_pages() is None          # its meta is not in yet
    d.receive_data(frame[HEADER.size : HEADER.size + d.frame_head_missing()])
    assert d.frame_head_missing() == 0
    assert d.incoming_pages() is None          # compressed
    with pytest.raises(LocalProtocolError, match="not a raw Pages frame"):
        d.place_frame([bytearray(len(text))])


@pytest.mark.parametrize("runs, words", [
    (((BASE + 64 * PS, 2),), "outside layout"),
    (((BASE + 62 * PS, 4),), "outside layout"),
])
def test_runs_outside_the_layout_are_refused_before_any_byte_lands(runs, words):
    p = opened(compress="none")
    body = bytes(sum(n for _, n in runs) * PS)
    frame = craft(Pages, encode_meta(Pages(round=0, runs=runs, payload=body)), seq=3, body=body)
    d = p.conn[D]
    d.receive_data(frame[:200])
    assert d.next_event() is NEED_DATA
    with pytest.raises(RemoteProtocolError, match=words):
        d.incoming_pages()
    assert d.state is State.ERROR


def test_a_payload_shorter_than_its_runs_is_refused_before_any_byte_lands():
    p = opened(compress="none")
    frame = craft(Pages, encode_meta(Pages(round=0, runs=((BASE, 4),), payload=bytes(4 * PS))), seq=3,
                  body=bytes(3 * PS))
    d = p.conn[D]
    d.receive_data(frame[:200])
    d.next_event()
    with pytest.raises(RemoteProtocolError, match="raw payload of 12288 bytes, the runs need 16384"):
        d.incoming_pages()


def test_pages_the_state_allows_none_of_are_refused_before_any_byte_lands():
    p = ConnectionPair(compress="none")
    p.handshake()                       # no Layout yet
    frame = craft(Pages, encode_meta(Pages(round=0, runs=((BASE, 64),), payload=bytes(64 * PS))), seq=2,
                  body=bytes(64 * PS))
    d = p.conn[D]
    d.receive_data(frame[:200])
    d.next_event()
    with pytest.raises(RemoteProtocolError):
        d.incoming_pages()
    assert d.state is State.ERROR


def test_place_misuse_is_refused():
    p = opened(compress="none")
    frame = p.conn[S].send(Pages(round=0, runs=RUNS, payload=PAYLOAD))
    d = p.conn[D]
    d.receive_data(frame[:200])
    d.next_event()
    with pytest.raises(LocalProtocolError, match="views of 4096 bytes for a payload of 32768"):
        d.place_frame([bytearray(PS)])
    with pytest.raises(LocalProtocolError, match="writable"):
        d.place_frame([bytes(len(PAYLOAD))])
    views = d.place_frame([bytearray(len(PAYLOAD))])
    with pytest.raises(LocalProtocolError, match="receive_data while a placed frame is incomplete"):
        d.receive_data(b"x")
    missing = sum(v.nbytes for v in views)
    with pytest.raises(LocalProtocolError, match=f"the frame misses {missing}"):
        d.gathered(missing + 1)


def test_end_of_stream_inside_a_placed_frame_is_a_truncated_frame():
    p = opened(compress="none")
    frame = p.conn[S].send(Pages(round=0, runs=RUNS, payload=PAYLOAD))
    d = p.conn[D]
    d.receive_data(frame[:200])
    d.next_event()
    views = d.place_frame([bytearray(len(PAYLOAD))])
    views[0][:10] = frame[200:210]
    d.gathered(10)
    d.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated frame at byte .*: the stream ended"):
        d.next_event()
    assert d.state is State.ERROR


@pytest.mark.parametrize("token", [None, TOKEN])
def test_corruption_in_a_placed_payload_is_caught(token):
    p = opened(token=token, compress="none")
    frame = bytearray(p.conn[S].send(Pages(round=0, runs=RUNS, payload=PAYLOAD)))
    meta_end = len(frame) - len(PAYLOAD) - 2 * (16 if token else 8)
    frame[meta_end + 500] ^= 1
    place(p.conn[D], bytes(frame), meta_end)
    with pytest.raises(RemoteProtocolError, match="payload of frame seq .* fails its"):
        drain(p.conn[D])


@pytest.mark.parametrize("token", [None, TOKEN])
def test_a_forged_sequence_number_in_a_placed_frame_is_caught(token):
    """The header is not vouched for until the frame tag is in: a flipped bit there fails it."""
    p = opened(token=token, compress="none")
    frame = bytearray(p.conn[S].send(Pages(round=0, runs=RUNS, payload=PAYLOAD)))
    meta_end = len(frame) - len(PAYLOAD) - 2 * (16 if token else 8)
    frame[HEADER.size - 1] ^= 1          # the sequence number's top byte
    place(p.conn[D], bytes(frame), meta_end)
    with pytest.raises(RemoteProtocolError, match="frame at .* fails its"):
        drain(p.conn[D])
