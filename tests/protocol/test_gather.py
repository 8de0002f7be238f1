"""Gathering a large frame into the caller's buffer: no join, no copy of the payload."""

import os
import sys

import pytest
import zstandard

from migrator.core.errors import LocalProtocolError, RemoteProtocolError
from migrator.protocol import NEED_DATA, Connection, Pages, PendingPages, RoundEnd, State
from migrator.protocol._frames import HEADER

from .helpers import LAYOUT, PS, TOKEN, D, S, ConnectionPair, drain

BASE = LAYOUT.regions[0].start
PAYLOAD = os.urandom(16 * PS)


def opened(**kwargs) -> ConnectionPair:
    p = ConnectionPair(**kwargs)
    p.open()
    return p


def gather(conn: Connection, frame: bytes, head: int, pieces: int = 3) -> bytearray:
    """Feed ``head`` bytes the usual way, then the rest of ``frame`` into a buffer of its own,
    written in ``pieces`` parts as a socket would; returns the buffer."""
    conn.receive_data(frame[:head])
    assert conn.next_event() is NEED_DATA
    assert conn.incomplete_frame() == len(frame)
    buffer = bytearray(len(frame))
    rest = conn.gather_frame(buffer)
    assert len(rest) == len(frame) - head and conn.incomplete_frame() == 0
    cuts = [head + (len(frame) - head) * i // pieces for i in range(pieces + 1)]
    for start, end in zip(cuts, cuts[1:]):
        assert conn.next_event() is NEED_DATA
        rest[start - head : end - head] = frame[start:end]
        conn.gathered(end - start)
    return buffer


@pytest.mark.parametrize("head", [HEADER.size, HEADER.size + 7, 5000])
@pytest.mark.parametrize("token", [None, TOKEN])
def test_gathered_raw_payload_is_a_read_only_view_of_the_buffer(head, token):
    p = opened(token=token, compress="none")
    frame = p.conn[S].send(Pages(round=0, runs=((BASE, 16),), payload=PAYLOAD))
    buffer = gather(p.conn[D], frame, head)
    [event] = drain(p.conn[D])
    assert event == Pages(round=0, runs=((BASE, 16),), payload=PAYLOAD)
    assert event.payload.obj is buffer and event.payload.readonly   # not a copy
    with pytest.raises(TypeError):
        event.payload[0] = 0


def test_bytes_after_a_gathered_frame_are_fed_as_usual():
    p = opened(compress="none")
    first = p.conn[S].send(Pages(round=0, runs=((BASE, 16),), payload=PAYLOAD))
    more = p.conn[S].send(Pages(round=0, runs=((BASE + 16 * PS, 1),), payload=b"m" * PS))
    more += p.conn[S].send(RoundEnd(round=0))
    gather(p.conn[D], first, 100, pieces=1)
    p.conn[D].receive_data(more[:10])     # a socket read that ran past the frame
    events = drain(p.conn[D])
    p.conn[D].receive_data(more[10:])
    events += drain(p.conn[D])
    assert [type(e) for e in events] == [Pages, Pages, RoundEnd]
    assert bytes(events[1].payload) == b"m" * PS


def test_deferred_and_compressed_frames_gather_too():
    p = opened(defer_payloads=True)
    text = (b"compressible page text " * PS)[: 16 * PS]
    frame = p.conn[S].send(Pages(round=0, runs=((BASE, 16),), payload=text))
    assert len(frame) < len(text)
    buffer = gather(p.conn[D], frame, HEADER.size)
    [pending] = drain(p.conn[D])
    assert type(pending) is PendingPages and pending.body.obj is buffer
    pages = pending.decode(zstandard.ZstdDecompressor())
    assert bytes(pages.payload) == text
    del pending
    assert sys.getrefcount(buffer) == 2, "nothing holds the frame buffer once it is decoded"


def test_incomplete_frame_is_known_only_from_a_whole_header():
    p = opened()
    frame = p.conn[S].send(Pages(round=0, runs=((BASE, 16),), payload=PAYLOAD))
    d = p.conn[D]
    assert d.incomplete_frame() == 0
    d.receive_data(frame[: HEADER.size - 1])
    assert d.next_event() is NEED_DATA and d.incomplete_frame() == 0
    d.receive_data(frame[HEADER.size - 1 : HEADER.size])
    assert d.next_event() is NEED_DATA and d.incomplete_frame() == len(frame)
    d.receive_data(frame[HEADER.size :])
    assert d.incomplete_frame() == 0      # complete now, though not decoded yet
    assert type(d.next_event()) is Pages and d.incomplete_frame() == 0


def test_gather_misuse_is_refused():
    p = opened(compress="none")
    frame = p.conn[S].send(Pages(round=0, runs=((BASE, 16),), payload=PAYLOAD))
    d = p.conn[D]
    with pytest.raises(LocalProtocolError, match="no incomplete frame"):
        d.gather_frame(bytearray(len(frame)))
    with pytest.raises(LocalProtocolError, match="no frame is being gathered"):
        d.gathered(1)
    d.receive_data(frame[:100])
    d.next_event()
    with pytest.raises(LocalProtocolError, match=f"a buffer of {len(frame) + 1} bytes for a frame of {len(frame)}"):
        d.gather_frame(bytearray(len(frame) + 1))
    with pytest.raises(LocalProtocolError, match="writable"):
        d.gather_frame(bytes(len(frame)))
    d.gather_frame(bytearray(len(frame)))
    with pytest.raises(LocalProtocolError, match="receive_data while a gathered frame is incomplete"):
        d.receive_data(b"x")
    with pytest.raises(LocalProtocolError, match=f"the frame misses {len(frame) - 100}"):
        d.gathered(len(frame))
    with pytest.raises(LocalProtocolError, match="the frame misses"):
        d.gathered(0)


def test_end_of_stream_inside_a_gathered_frame_is_a_truncated_frame():
    p = opened(compress="none")
    frame = p.conn[S].send(Pages(round=0, runs=((BASE, 16),), payload=PAYLOAD))
    d = p.conn[D]
    d.receive_data(frame[:100])
    d.next_event()
    rest = d.gather_frame(bytearray(len(frame)))
    rest[:50] = frame[100:150]
    d.gathered(50)
    d.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=f"truncated frame at byte .*: the stream ended after 150 of {len(frame)} bytes"):
        d.next_event()
    assert d.state is State.ERROR


def test_corruption_in_a_gathered_frame_is_caught():
    p = opened(compress="none")
    frame = bytearray(p.conn[S].send(Pages(round=0, runs=((BASE, 16),), payload=PAYLOAD)))
    frame[HEADER.size + 500] ^= 1
    gather(p.conn[D], bytes(frame), HEADER.size)
    with pytest.raises(RemoteProtocolError, match="payload of frame seq .* fails its checksum"):
        drain(p.conn[D])
