"""Every event survives the codec unchanged (hypothesis), in each session mode."""

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.core.errors import LocalProtocolError
from migrator.core.model import Region
from migrator.protocol import (
    Abort, Ack, Acked, Auth, Commit, Connection, Digest, DigestKind, Fence, Freeze, Hello, Index, IndexEntry, Layout,
    Pages, RoundEnd, Zero,
)

from .helpers import LAYOUT, PS, TOKEN, D, S, ConnectionPair, drain

tokens = st.sampled_from([None, TOKEN])
compressions = st.sampled_from(["zstd:1", "zstd:-3", "zstd:9", "none"])
names = st.text(min_size=1, max_size=20)
scalars = st.one_of(
    st.integers(-(1 << 63), (1 << 64) - 1), st.floats(allow_nan=False), st.text(max_size=40), st.booleans(), st.none()
)
mappings = st.dictionaries(names, scalars, max_size=6)
durations = st.one_of(st.floats(0, 1e12), st.integers(0, 1 << 40))
timings = st.dictionaries(names, durations, max_size=6)
rounds = st.integers(0, (1 << 32) - 1)
counts = st.integers(0, (1 << 64) - 1)
digests = st.builds(Digest, kind=st.sampled_from(DigestKind), value=st.binary(max_size=64), last=st.booleans())


@st.composite
def acks(draw, of=st.sampled_from([a for a in Acked if a not in (Acked.COMMIT, Acked.SWITCH, Acked.RESUME)])):
    """Acks with every field their ``of`` allows."""
    of = draw(of)
    ok = draw(st.booleans())
    return Ack(of=of, ok=ok, reason="" if ok else draw(st.text(max_size=200)),
               round=draw(rounds) if of is Acked.ROUND else 0,
               ready_ms=draw(durations) if of is Acked.LAYOUT else 0.0, timings_ms=draw(timings))


@st.composite
def runs(draw, max_runs=6):
    """Runs inside LAYOUT (possibly repeated or overlapping: the codec does not forbid that)."""
    result = []
    for _ in range(draw(st.integers(1, max_runs))):
        region = draw(st.sampled_from(LAYOUT.regions))
        pages = region.length // PS
        first = draw(st.integers(0, pages - 1))
        count = draw(st.integers(1, min(4, pages - first)))
        result.append((region.start + first * PS, count))
    return tuple(result)


@st.composite
def pages_events(draw):
    event_runs = draw(runs())
    size = sum(n for _, n in event_runs) * PS
    kind = draw(st.sampled_from(["random", "text", "zero", "mixed"]))
    if kind == "random":   # from a seed: hypothesis keeps its examples small
        payload = random.Random(draw(st.integers(0, 1 << 32))).randbytes(size)
    elif kind == "text":
        payload = (draw(st.text(min_size=1, max_size=30)).encode() * size)[:size]
    elif kind == "zero":
        payload = bytes(size)
    else:                  # zero pages among others: they travel as a bitmap (flag ZEROS)
        rng = random.Random(draw(st.integers(0, 1 << 32)))
        payload = b"".join(rng.choice([bytes(PS), rng.randbytes(PS), b"page" * (PS // 4)]) for _ in range(size // PS))
    return Pages(round=draw(rounds), runs=event_runs, payload=payload)


source_events = st.one_of(
    pages_events(),
    st.builds(Zero, round=rounds, runs=runs(max_runs=40)),
    st.builds(RoundEnd, round=rounds, pages=counts),    # pre-copy rounds: made final after Freeze
    digests,
)
fences = st.lists(st.integers(0, (1 << 64) - 1), max_size=3).map(lambda counts: [Fence(frames=(n,)) for n in sorted(counts)])
dest_events = st.one_of(acks(), digests)
regions = st.lists(st.tuples(st.integers(1, 1 << 20), st.integers(1, 1 << 16)), min_size=0, max_size=8).map(
    lambda spans: tuple(_layout_regions(spans))
)


def _layout_regions(spans):
    start = 0
    for gap, pages in spans:
        start += gap * PS
        yield Region(start, pages * PS)
        start += pages * PS


@settings(max_examples=150, deadline=None)
@given(token=tokens, compress=compressions, events=st.lists(source_events, min_size=1, max_size=6),
       replies=st.lists(dest_events, max_size=3), fences=fences, commit=acks(st.just(Acked.COMMIT)))
def test_round_trip_of_session_events(token, compress, events, replies, fences, commit):
    p = ConnectionPair(token=token, compress=compress)
    p.open()
    p.send(S, events + fences)
    p.send(D, replies)
    p.send(S, [Freeze(round=7)] + [replace(e, final=True) if type(e) is RoundEnd else e for e in events])
    p.send(S, Commit())
    p.send(D, commit)


@settings(max_examples=60, deadline=None)
@given(token=tokens, features=st.lists(names, max_size=5).map(tuple), page_size=st.sampled_from([4096, 16384, 1 << 21]),
       streams=st.integers(1, 64), layout_regions=regions, meta=mappings)
def test_round_trip_of_handshake_and_layout(token, features, page_size, streams, layout_regions, meta):
    p = ConnectionPair(token=token)
    [hello] = p.send(S, Hello(page_size=page_size, features=features, streams=streams), expect=...)
    assert (hello.page_size, hello.features, hello.streams, hello.auth) == (page_size, features, streams, token is not None)
    [reply] = p.send(D, Hello(features=features), expect=...)
    assert reply.features == features and reply.session == p.conn[S].session_id
    p.send(S, Auth(), expect=...)
    layout = Layout(regions=layout_regions, page_size=4096, meta=meta)
    if page_size == 4096:
        p.send(S, layout)
    else:
        with pytest.raises(LocalProtocolError, match=f"Layout.page_size 4096 differs from the source's Hello.page_size {page_size}"):
            p.conn[S].send(layout)


@settings(max_examples=60, deadline=None)
@given(token=tokens, who=st.sampled_from([S, D]), reason=st.text(max_size=200))
def test_round_trip_of_abort(token, who, reason):
    p = ConnectionPair(token=token)
    p.open()
    p.send(who, Abort(reason=reason))


@settings(max_examples=60, deadline=None)
@given(token=tokens, events=st.lists(source_events, max_size=5),
       rows=st.lists(st.tuples(st.integers(1, 1 << 30), rounds, st.integers(0, 1 << 20)), max_size=20))
def test_round_trip_of_a_recorded_stream_and_its_index(token, events, rows):
    writer = Connection(S, token=token, recorded=True)
    reader = Connection(D, token=token, recorded=True)
    data = writer.send(Hello()) + writer.send(LAYOUT) + b"".join(writer.send(e) for e in events)
    entries, offset = [], 0
    kinds = ["Hello", "Layout"] + [type(e).__name__ for e in events]
    for i, kind in enumerate(kinds):
        length, round_, pages = rows[i] if i < len(rows) else (1, 0, 0)
        entries.append(IndexEntry(offset=offset, length=length, kind=kind, round=round_, pages=pages))
        offset += length
    index = Index(entries=tuple(entries))
    reader.receive_data(data + writer.send(index))
    got = drain(reader)
    assert got[1:] == [LAYOUT, *events, index]
