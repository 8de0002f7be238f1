"""Connection: the migration flow, the state table, authentication, parallel streams, images."""

import os
import re

import pytest
import zstandard

from migrator.core.errors import LocalProtocolError, RemoteProtocolError
from migrator.protocol import (
    NEED_DATA, Abort, Ack, Acked, Auth, Commit, Connection, ConnectionClosed, Digest, DigestKind, Fence, Freeze,
    Hello, Index, IndexEntry, Pages, PendingPages, Role, RoundEnd, State, Zero,
)
from migrator.protocol._state import LIVE, ack, symbol
from migrator.protocol._wire import encode_meta

from .helpers import LAYOUT, PS, TOKEN, D, S, ConnectionPair, craft, drain

BASE = LAYOUT.regions[0].start


def pages(address=BASE, count=2, fill=b"p"):
    return Pages(round=0, runs=((address, count),), payload=fill * (count * PS))


@pytest.mark.parametrize("token", [None, TOKEN])
def test_full_migration_flow(token):
    p = ConnectionPair(token=token)
    p.open()
    assert p.conn[S].authenticated is (token is not None) and p.conn[D].authenticated is (token is not None)
    p.send(D, Ack(of=Acked.LAYOUT, ok=True, ready_ms=0.25))
    p.send(S, [pages(), Zero(round=0, runs=((BASE + 8 * PS, 4),)), RoundEnd(round=0, pages=6)])
    p.send(D, Ack(of=Acked.ROUND, ok=True, round=0))
    p.send(S, [Freeze(round=1), pages(BASE + PS, 1, b"q"), RoundEnd(round=1, pages=1, final=True),
               Digest(kind=DigestKind.PAGES, value=b"d" * 16, last=False), Digest(kind=DigestKind.REGION, value=b"r")])
    p.send(D, [Digest(kind=DigestKind.PAGES, value=b"d" * 16), Ack(of=Acked.DIGEST, ok=True, timings_ms={"check": 1.5})])
    p.send(S, Commit())
    p.send(D, Ack(of=Acked.COMMIT, ok=True, timings_ms={"resume": 0.5}))
    assert p.conn[S].state is p.conn[D].state is State.DONE
    p.conn[D].receive_data(b"")
    assert drain(p.conn[D]) == [ConnectionClosed(expected=True)]


def test_handshake_exchanges_versions_features_and_session():
    p = ConnectionPair()
    hello_at_dest = p.send(S, Hello(streams=3, features=("zstd", "x")), expect=...)[0]
    assert hello_at_dest.features == ("zstd", "x") and hello_at_dest.streams == 3 and len(hello_at_dest.nonce) == 16
    reply = p.send(D, Hello(), expect=...)[0]
    assert reply.session == p.conn[S].session_id == p.conn[D].session_id and len(reply.session) == 16
    assert p.conn[S].peer_hello == reply


@pytest.mark.parametrize(
    "event, state_words",
    [
        (pages(), "Pages from source is not allowed in state READY"),
        (Commit(), "Commit from source is not allowed in state READY"),
        (Freeze(round=0), "Freeze from source is not allowed in state READY"),
    ],
)
def test_nonsense_before_layout_is_refused_locally_and_remotely(event, state_words):
    p = ConnectionPair()
    p.handshake()
    with pytest.raises(LocalProtocolError, match=state_words):
        p.conn[S].send(event)
    # the same frame from a misbehaving peer (seq 2 follows its Hello and Auth)
    p = ConnectionPair()
    p.handshake()
    body = bytes(event.payload) if isinstance(event, Pages) else b""
    p.conn[D].receive_data(craft(type(event), encode_meta(event), seq=2, body=body))
    with pytest.raises(RemoteProtocolError, match=state_words):
        drain(p.conn[D])
    assert p.conn[D].state is State.ERROR


def test_ack_commit_only_after_commit_and_nothing_after_abort():
    p = ConnectionPair()
    p.open()
    with pytest.raises(LocalProtocolError, match=r"Ack\(commit\) from dest is not allowed in state PRECOPY"):
        p.conn[D].send(Ack(of=Acked.COMMIT, ok=True))
    p = ConnectionPair()
    p.open()
    p.send(D, Abort(reason="disk full"))
    assert p.conn[S].state is State.ABORTED_BY_DEST
    with pytest.raises(LocalProtocolError, match="after the session was aborted"):
        p.conn[S].send(pages())


def in_state(state: State, **kwargs) -> ConnectionPair:
    """A pair with both sides in PRECOPY, FROZEN or COMMITTING (the destination sent only its Hello)."""
    p = ConnectionPair(**kwargs)
    p.open()
    if state in (State.FROZEN, State.COMMITTING):
        p.send(S, Freeze(round=1))
    if state is State.COMMITTING:
        p.send(S, Commit())
    assert p.conn[S].state is p.conn[D].state is state
    return p


@pytest.mark.parametrize("of", list(Acked))
@pytest.mark.parametrize("state", [State.PRECOPY, State.FROZEN, State.COMMITTING])
def test_the_table_acts_on_what_an_ack_answers(state, of):
    """Answers to Layout, RoundEnd and Digest before Commit; an Ack of commit, and only that, after
    it, where it completes the session. An Ack of a switch only after a Switch."""
    allowed = of is Acked.COMMIT if state is State.COMMITTING else of not in (Acked.COMMIT, Acked.SWITCH, Acked.RESUME)
    event = Ack(of=of, ok=True)
    p = in_state(state)
    if allowed:
        p.send(D, event)
        assert p.conn[S].state is p.conn[D].state is (State.DONE if of is Acked.COMMIT else state)
        return
    words = re.escape(f"Ack({of.value}) from dest is not allowed in state {state.value}")
    with pytest.raises(LocalProtocolError, match=words):
        p.conn[D].send(event)
    p = in_state(state)
    p.conn[S].receive_data(craft(Ack, encode_meta(event), seq=1))
    with pytest.raises(RemoteProtocolError, match=words):
        drain(p.conn[S])
    assert p.conn[S].state is State.ERROR


def test_an_ack_of_round_does_not_complete_committing():
    p = in_state(State.COMMITTING)
    p.conn[S].receive_data(craft(Ack, encode_meta(Ack(of=Acked.ROUND, ok=True, round=1)), seq=1))
    with pytest.raises(RemoteProtocolError, match=r"Ack\(round\) from dest is not allowed in state COMMITTING"):
        drain(p.conn[S])
    assert p.conn[S].state is State.ERROR
    p = in_state(State.COMMITTING)
    p.send(D, Ack(of=Acked.COMMIT, ok=False, reason="resume failed"))   # a refusal ends the session too
    assert p.conn[S].state is State.DONE


@pytest.mark.parametrize("recorded", [False, True])
@pytest.mark.parametrize("state, final", [(State.PRECOPY, True), (State.FROZEN, False)])
def test_the_final_round_end_comes_after_freeze_and_only_there(state, final, recorded):
    event = RoundEnd(round=1, pages=1, final=final)
    words = re.escape(f"{symbol(event, S)} from source is not allowed in state {state.value}")
    if recorded:
        writer = Connection(S, recorded=True)
        frames = [writer.send(Hello()), writer.send(LAYOUT)]
        if state is State.FROZEN:
            frames.append(writer.send(Freeze(round=1)))
        with pytest.raises(LocalProtocolError, match=words):
            writer.send(event)
        reader = Connection(D, recorded=True)
        reader.receive_data(b"".join(frames) + craft(RoundEnd, encode_meta(event), seq=len(frames)))
        with pytest.raises(RemoteProtocolError, match=words):
            drain(reader)
        return
    p = in_state(state)
    with pytest.raises(LocalProtocolError, match=words):
        p.conn[S].send(event)
    p = in_state(state)
    p.conn[D].receive_data(craft(RoundEnd, encode_meta(event), seq=4 if state is State.FROZEN else 3))
    with pytest.raises(RemoteProtocolError, match=words):
        drain(p.conn[D])
    assert p.conn[D].state is State.ERROR


def test_symbols_derive_from_the_typed_fields():
    assert symbol(Ack(of=Acked.COMMIT, ok=True), D) == ack(Acked.COMMIT) == "Ack(commit)"
    assert symbol(RoundEnd(round=3, final=True), S) == "RoundEnd(final)" and symbol(RoundEnd(round=3), S) == "RoundEnd"
    assert symbol(Digest(kind=DigestKind.REGION, value=b"", last=False), S) == "Digest"
    done = [key for key, target in LIVE[State.COMMITTING].items() if target is State.DONE]
    assert done == [(D, ack(Acked.COMMIT))]


def test_frames_in_flight_when_we_abort_are_dropped():
    p = ConnectionPair()
    p.open()
    in_flight = p.conn[S].send(pages())
    p.conn[D].send(Abort(reason="destination failed"))
    p.conn[D].receive_data(in_flight + p.conn[S].send(Abort(reason="source saw it")))
    assert drain(p.conn[D]) == [Abort(reason="source saw it")]
    assert p.conn[D].state is State.ABORTED


def test_eof_before_commit_ack_is_unexpected():
    p = ConnectionPair()
    p.open()
    p.send(S, [Freeze(round=0), Commit()])
    p.conn[S].receive_data(b"")
    assert drain(p.conn[S]) == [ConnectionClosed(expected=False)]


def test_runs_outside_layout_and_wrong_payload_size_are_refused_on_send():
    p = ConnectionPair()
    p.open()
    end = LAYOUT.regions[0].end
    with pytest.raises(LocalProtocolError, match=f"page run {end - PS:#x} \\+2 outside layout"):
        p.conn[S].send(pages(end - PS, 2))
    p = ConnectionPair()
    p.open()
    with pytest.raises(LocalProtocolError, match="not aligned"):
        p.conn[S].send(Zero(round=0, runs=((BASE + 1, 1),)))
    p = ConnectionPair()
    p.open()
    with pytest.raises(LocalProtocolError, match="Pages.payload: 8192 bytes for 1 pages of 4096"):
        p.conn[S].send(Pages(round=0, runs=((BASE, 1),), payload=b"x" * PS * 2))


def test_runs_spanning_regions_and_many_runs_are_checked():
    p = ConnectionPair(compress="none")
    p.open()
    second = LAYOUT.regions[1].start
    runs = tuple((BASE + 2 * i * PS, 1) for i in range(32)) + ((second, 16),)
    event = Pages(round=0, runs=runs, payload=os.urandom(48 * PS))
    p.send(S, event)


def test_error_state_after_a_failure_refuses_everything():
    p = ConnectionPair()
    p.open()
    p.conn[D].receive_data(b"garbage that is not a frame at all")
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        p.conn[D].next_event()
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        p.conn[D].next_event()
    with pytest.raises(LocalProtocolError, match="failed earlier"):
        p.conn[D].send(Ack(of=Acked.ROUND, ok=True))
    p.conn[S].send_failed()
    with pytest.raises(LocalProtocolError, match="ERROR"):
        p.conn[S].send(pages())


def test_send_refuses_handshake_fields_and_oversized_frames():
    conn = Connection(Role.SOURCE)
    with pytest.raises(LocalProtocolError, match="set by the Connection"):
        conn.send(Hello(nonce=b"x" * 16))
    p = ConnectionPair()
    p.conn[S] = Connection(S, max_frame=64 << 10)
    p.open()
    with pytest.raises(LocalProtocolError, match="exceeds max_frame"):
        p.conn[S].send(pages(BASE, 64))


@pytest.mark.parametrize(
    "source_token, dest_token, words",
    [
        (TOKEN, b"another-token-of-16+bytes", "the destination does not know the token"),
        (None, TOKEN, "offers no authentication, but a token is required"),
        (TOKEN, None, "authenticates with a token, but this side has none"),
    ],
)
def test_authentication_failures_name_the_reason(source_token, dest_token, words):
    s = Connection(S, token=source_token)
    d = Connection(D, token=dest_token)
    d.receive_data(s.send(Hello()))
    if dest_token is None or source_token is None:
        with pytest.raises(RemoteProtocolError, match=words):
            drain(d)
        return
    drain(d)
    s.receive_data(d.send(Hello()))
    with pytest.raises(RemoteProtocolError, match=words):
        drain(s)


def test_source_with_a_wrong_proof_is_refused_by_the_destination():
    p = ConnectionPair(token=TOKEN)
    p.send(S, Hello(), expect=...)
    p.conn[D].send(Hello())
    p.conn[D].receive_data(craft(Auth, {"proof": b"x" * 32}, seq=1))
    with pytest.raises(RemoteProtocolError, match="the source does not know the token"):
        drain(p.conn[D])


def test_a_session_recorded_earlier_cannot_be_replayed_into_a_new_one():
    old = ConnectionPair(token=TOKEN)
    old.open()
    old.send(S, pages())
    new = ConnectionPair(token=TOKEN)
    new.handshake()
    new.conn[D].receive_data(old.wire[S][2])   # the old Layout frame, MAC'd under the old keys
    with pytest.raises(RemoteProtocolError, match="fails its MAC"):
        drain(new.conn[D])


def joined_pair(token):
    p = ConnectionPair(token=token)
    sessions = {}
    p.handshake(streams=2)
    sessions[p.conn[D].session_id] = p.conn[D]
    s1 = Connection(S, token=token, join=p.conn[S], stream=1)
    d1 = Connection(D, token=token, sessions=sessions.get)
    d1.receive_data(s1.send(Hello()))
    assert drain(d1)[0].stream == 1
    s1.receive_data(d1.send(Hello()))
    drain(s1)
    d1.receive_data(s1.send(Auth()))
    assert [type(e) for e in drain(d1)] == [Auth]
    return p, s1, d1


@pytest.mark.parametrize("token", [None, TOKEN])
def test_parallel_stream_carries_pages_checked_against_the_primary_layout(token):
    p, s1, d1 = joined_pair(token)
    assert d1.state is State.DATA and d1.stream == 1
    with pytest.raises(LocalProtocolError, match="cannot send Pages on stream 1: the session is in state READY"):
        joined_pair(token)[1].send(pages())
    p.send(S, LAYOUT)
    d1.receive_data(s1.send(pages()))
    assert drain(d1) == [pages()]
    with pytest.raises(LocalProtocolError, match="RoundEnd from source is not allowed in state DATA"):
        s1.send(RoundEnd(round=0))


def test_parallel_stream_data_after_commit_is_refused():
    p, s1, d1 = joined_pair(None)
    p.send(S, LAYOUT)
    late = s1.send(pages())          # sent on stream 1 ...
    p.send(S, [Fence(frames=(0, 0)), Freeze(round=0), Commit()])   # ... but not counted by the Fence
    d1.receive_data(late)
    with pytest.raises(RemoteProtocolError, match="after the session's Commit or Abort"):
        drain(d1)


def test_joins_for_unknown_sessions_and_duplicate_streams_are_refused():
    p = ConnectionPair()
    p.handshake(streams=2)
    sessions = {p.conn[D].session_id: p.conn[D]}
    s1 = Connection(S, join=p.conn[S], stream=1)
    hello = s1.send(Hello())
    first = Connection(D, sessions=sessions.get)
    first.receive_data(hello)
    drain(first)
    again = Connection(D, sessions=sessions.get)
    again.receive_data(hello)
    with pytest.raises(RemoteProtocolError, match="joined twice"):
        drain(again)
    stranger = Connection(D, sessions={}.get)
    stranger.receive_data(hello)
    with pytest.raises(RemoteProtocolError, match="unknown or finished session"):
        drain(stranger)
    with pytest.raises(LocalProtocolError, match="outside 1..1"):
        Connection(S, join=p.conn[S], stream=2)


@pytest.mark.parametrize("token", [None, TOKEN])
def test_recorded_stream_round_trip_and_index(token):
    writer = Connection(S, token=token, recorded=True)
    frames = [writer.send(Hello()), writer.send(LAYOUT), writer.send(pages()), writer.send(RoundEnd(round=0))]
    offsets = [0]
    for frame in frames:
        offsets.append(offsets[-1] + len(frame))
    entries = tuple(
        IndexEntry(offset=o, length=len(f), kind=k) for o, f, k in zip(offsets, frames, ["Hello", "Layout", "Pages", "RoundEnd"])
    )
    frames.append(writer.send(Index(entries=entries)))
    with pytest.raises(LocalProtocolError, match="not allowed in state SEALED"):
        writer.send(pages())
    reader = Connection(D, token=token, recorded=True, defer_payloads=True)
    reader.receive_data(b"".join(frames))
    reader.receive_data(b"")
    events = drain(reader)
    assert type(events[0]) is Hello and events[0].recorded
    assert type(events[2]) is PendingPages and events[2].decode(zstandard.ZstdDecompressor()) == pages()
    assert events[3:] == [RoundEnd(round=0), Index(entries=entries), ConnectionClosed(expected=True)]
    # jump straight to the index, as an image reader does
    jumper = Connection(D, token=token, recorded=True)
    jumper.receive_data(b"".join(frames))
    assert type(jumper.next_event()) is Hello
    jumper.skip_to(4, offsets[4])
    jumper.receive_data(frames[4])
    assert jumper.next_event() == Index(entries=entries)


def test_recorded_image_needs_the_right_token_and_is_not_a_live_stream():
    writer = Connection(S, token=TOKEN, recorded=True)
    hello = writer.send(Hello())
    reader = Connection(D, token=b"some-other-token-123", recorded=True)
    reader.receive_data(hello)
    with pytest.raises(RemoteProtocolError, match="recorded with a different token"):
        drain(reader)
    live = Connection(D, token=TOKEN)
    live.receive_data(hello)
    with pytest.raises(RemoteProtocolError, match="a recorded image where a live peer was expected"):
        drain(live)


def test_need_data_until_a_whole_frame_arrived():
    p = ConnectionPair()
    p.open()
    frame = p.conn[S].send(pages(fill=b"z"))
    for i in range(len(frame) - 1):
        p.conn[D].receive_data(frame[i : i + 1])
        assert p.conn[D].next_event() is NEED_DATA
    p.conn[D].receive_data(frame[-1:])
    assert p.conn[D].next_event() == pages(fill=b"z")
    stats = p.conn[D].statistics()
    assert stats.frames_received == 4 and stats.state is State.PRECOPY


def test_sampling_sends_incompressible_pages_raw_without_a_worker_thread():
    p = ConnectionPair(compress="zstd:1")
    p.open()
    sampler = zstandard.ZstdCompressor(level=1)
    random_pages = os.urandom(32 * PS)
    text_pages = (b"sampled text-like pages " * (32 * PS))[: 32 * PS]
    raw = p.conn[S].send_deferred(Pages(round=0, runs=((BASE, 32),), payload=random_pages)).sample(sampler)
    assert raw.compression.level is None and not raw.needs_thread      # only a checksum is left to compute
    packed = p.conn[S].send_deferred(Pages(round=0, runs=((BASE, 32),), payload=text_pages)).sample(sampler)
    assert packed.sampled and packed.compression.level == 1 and packed.needs_thread
    raw_frame, packed_frame = raw.finish(), packed.finish()
    assert len(raw_frame) > len(random_pages) and len(packed_frame) < len(text_pages) // 4
    p.conn[D].receive_data(raw_frame + packed_frame)
    assert [bytes(e.payload) for e in drain(p.conn[D])] == [random_pages, text_pages]
