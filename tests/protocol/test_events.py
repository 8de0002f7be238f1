"""Event constructors refuse bad values with LocalProtocolError naming the field."""

import re

import pytest

from migrator.core.errors import LocalProtocolError
from migrator.core.model import Region
from migrator.protocol import (
    Abort, Ack, Acked, Digest, DigestKind, Fence, Freeze, Hello, Index, IndexEntry, Layout, Pages, RoundEnd, Zero,
)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: Pages(round=0, runs=(), payload=b""), "Pages.runs: must not be empty"),
        (lambda: Pages(round=0, runs=((0, 0),), payload=b"x" * 4096), "Pages.runs: page counts"),
        (lambda: Pages(round=0, runs=((-4096, 1),), payload=b"x" * 4096), "Pages.runs: an address"),
        (lambda: Pages(round=0, runs=((0, 1, 2),), payload=b"x" * 4096), "(address, pages) pair"),
        (lambda: Pages(round=0, runs=(("0", 1),), payload=b"x" * 4096), "must be ints"),
        (lambda: Pages(round=-1, runs=((0, 1),), payload=b"x" * 4096), "Pages.round"),
        (lambda: Pages(round=0, runs=((0, 3),), payload=b"x" * 4096), "Pages.payload"),
        (lambda: Pages(round=0, runs=((0, 1),), payload="text"), "Pages.payload: expected bytes"),
        (lambda: Zero(round=True, runs=((0, 1),)), "Zero.round: expected an int"),
        (lambda: Layout(regions=(Region(4096, 100),)), "not page aligned"),
        (lambda: Layout(regions=(Region(8192, 4096), Region(4096, 8192))), "overlaps"),
        (lambda: Layout(regions=(Region(0, 4096),), page_size=3000), "power of two"),
        (lambda: Layout(regions=(), meta={"a": [1]}), "Layout.meta: a: list"),
        (lambda: Layout(regions=(), meta={1: 2}), "Layout.meta: key 1"),
        (lambda: Layout(regions=(), meta={"x": 1 << 64}), "does not fit 64 bits"),
        (lambda: RoundEnd(round=0, pages=-1), "RoundEnd.pages: -1 is outside"),
        (lambda: RoundEnd(round=0, final=1), "RoundEnd.final: expected a bool, got int"),
        (lambda: Digest(kind="pages", value=b""), "Digest.kind: expected DigestKind, got str"),
        (lambda: Digest(kind=DigestKind.PAGES, value=b"x" * 65), "Digest.value"),
        (lambda: Digest(kind=DigestKind.PAGES, value=b"", last=None), "Digest.last: expected a bool"),
        (lambda: Ack(of="digest", ok=True), "Ack.of: expected Acked, got str"),
        (lambda: Ack(of=DigestKind.PAGES, ok=True), "Ack.of: expected Acked, got DigestKind"),
        (lambda: Ack(of=Acked.DIGEST, ok=1), "Ack.ok: expected a bool"),
        (lambda: Ack(of=Acked.DIGEST, ok=True, reason="fine"), "Ack.reason: given on an Ack that is ok"),
        (lambda: Ack(of=Acked.DIGEST, ok=False, reason=None), "Ack.reason: expected a str"),
        (lambda: Ack(of=Acked.DIGEST, ok=True, round=3), "Ack.round: set on an Ack of digest"),
        (lambda: Ack(of=Acked.ROUND, ok=True, ready_ms=1.0), "Ack.ready_ms: set on an Ack of round"),
        (lambda: Ack(of=Acked.LAYOUT, ok=True, ready_ms=-1.0), "Ack.ready_ms: -1.0 is not a finite number"),
        (lambda: Ack(of=Acked.LAYOUT, ok=True, ready_ms=float("nan")), "Ack.ready_ms: nan is not a finite"),
        (lambda: Ack(of=Acked.LAYOUT, ok=True, ready_ms=True), "Ack.ready_ms: expected a float, got bool"),
        (lambda: Ack(of=Acked.COMMIT, ok=True, timings_ms={"resume": "1"}), "Ack.timings_ms['resume']: expected a float"),
        (lambda: Ack(of=Acked.COMMIT, ok=True, timings_ms={"": 1.0}), "Ack.timings_ms: key '' is not"),
        (lambda: Ack(of=Acked.COMMIT, ok=True, timings_ms={str(i): 1.0 for i in range(65)}), "65 entries"),
        (lambda: Abort(reason=None), "Abort.reason"),
        (lambda: Freeze(round=1 << 40), "Freeze.round"),
        (lambda: Fence(frames=()), "Fence.frames"),
        (lambda: Hello(version=300), "Hello.version"),
        (lambda: Hello(features=["zstd"]), "Hello.features"),
        (lambda: Hello(streams=0), "Hello.streams"),
        (lambda: Index(entries=(IndexEntry(offset=5, length=1, kind="Hello"),)), "does not follow"),
    ],
)
def test_constructor_refuses_bad_values(make, words):
    with pytest.raises(LocalProtocolError, match=re.escape(words)):
        make()


def test_runs_are_normalised_to_tuples_and_mappings_frozen():
    event = Zero(round=1, runs=[[4096, 2], (8192, 1)])
    assert event.runs == ((4096, 2), (8192, 1)) and event.pages == 3
    timings = {"check": 1}
    ack = Ack(of=Acked.DIGEST, ok=True, timings_ms=timings)
    timings["check"] = 2
    assert ack.timings_ms["check"] == 1.0 and type(ack.timings_ms["check"]) is float
    with pytest.raises(TypeError):
        ack.timings_ms["other"] = 3.0


def test_control_fields_default_to_the_plain_case():
    assert RoundEnd(round=4) == RoundEnd(round=4, pages=0, final=False)
    assert Digest(kind=DigestKind.REGION, value=b"v").last is True
    ack = Ack(of=Acked.LAYOUT, ok=True, ready_ms=2)
    assert (ack.reason, ack.round, ack.ready_ms, dict(ack.timings_ms)) == ("", 0, 2.0, {})
    assert Ack(of=Acked.ROUND, ok=True, round=7).round == 7
    assert Ack(of=Acked.DIGEST, ok=False, reason="differs").reason == "differs"


def test_pages_accepts_memoryview_payload():
    buf = bytearray(3 * 4096)
    event = Pages(round=0, runs=((0, 2),), payload=memoryview(buf)[4096:])
    assert event.pages == 2
