"""Event constructors refuse bad values with LocalProtocolError naming the field."""

import pytest

from migrator.core.errors import LocalProtocolError
from migrator.core.model import Region
from migrator.protocol import (
    Abort, Ack, Digest, Fence, Freeze, Hello, Index, IndexEntry, Layout, Pages, RoundEnd, Zero,
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
        (lambda: RoundEnd(round=0, stats={"x": 1 << 64}), "does not fit 64 bits"),
        (lambda: Digest(kind="", value=b""), "Digest.kind: must not be empty"),
        (lambda: Digest(kind="pages", value=b"x" * 65), "Digest.value"),
        (lambda: Ack(of="digest", ok=1), "Ack.ok: expected a bool"),
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
    with pytest.raises(LocalProtocolError, match=words.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_runs_are_normalised_to_tuples_and_mappings_frozen():
    event = Zero(round=1, runs=[[4096, 2], (8192, 1)])
    assert event.runs == ((4096, 2), (8192, 1)) and event.pages == 3
    stats = {"a": 1}
    end = RoundEnd(round=0, stats=stats)
    stats["a"] = 2
    assert end.stats["a"] == 1
    with pytest.raises(TypeError):
        end.stats["b"] = 3


def test_pages_accepts_memoryview_payload():
    buf = bytearray(3 * 4096)
    event = Pages(round=0, runs=((0, 2),), payload=memoryview(buf)[4096:])
    assert event.pages == 2
