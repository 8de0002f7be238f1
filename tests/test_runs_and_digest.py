"""Helpers: page runs, layouts, per-page digests."""

import os
import random

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from migrator.core.digest import (
    REGION_PIECE, PageDigests, hash_pages_into, hash_region, new_hashes, region_digest, region_digest_read,
    region_pieces,
)
from migrator.core.model import MemoryLayout, Region
from migrator.core.runs import complement, count_pages, split_runs, union
from migrator.native.pages import ffi, lib

P = 4096


def test_split_runs_bounds_pages_and_runs_and_keeps_order():
    runs = [(0, 5), (0x10000, 3), (0x20000, 1)]
    batches = list(split_runs(runs, max_pages=4, max_runs=2))
    assert batches == [[(0, 4)], [(4 * P, 1), (0x10000, 3)], [(0x20000, 1)]]
    assert all(count_pages(b) <= 4 and len(b) <= 2 for b in batches)


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 9)), max_size=30), st.integers(1, 20), st.integers(1, 5))
def test_split_runs_covers_exactly_the_input(raw, max_pages, max_runs):
    runs, cursor = [], 0
    for gap, n in raw:
        cursor += gap * P
        runs.append((cursor, n))
        cursor += n * P
    batches = list(split_runs(runs, max_pages, max_runs))
    pages = [a + i * P for batch in batches for a, n in batch for i in range(n)]
    assert pages == [a + i * P for a, n in runs for i in range(n)]
    assert all(count_pages(b) <= max_pages and len(b) <= max_runs for b in batches)


def test_complement_and_union():
    regions = [Region(0, 16 * P), Region(0x100000, 4 * P)]
    present = [(1 * P, 2), (8 * P, 1), (0x100000, 4)]
    assert complement(regions, present) == [(0, 1), (3 * P, 5), (9 * P, 7)]
    assert union([(0, 2), (5 * P, 1)], [(1 * P, 3)]) == [(0, 4), (5 * P, 1)]
    assert union([], []) == []


def page_set(runs):
    return {a + i * P for a, n in runs for i in range(n)}


run_lists = st.lists(st.tuples(st.integers(0, 64), st.integers(0, 6)), max_size=40).map(
    lambda raw: [(a * P, n) for a, n in raw])


@given(run_lists, run_lists, st.booleans())
def test_union_holds_each_page_once_in_coalesced_order(a, b, presorted):
    """Sorted inputs take the native merge, unsorted ones the sort; both give the same answer."""
    if presorted:
        a, b = sorted(a), sorted(b)
    out = union(a, b)
    assert page_set(out) == page_set(a) | page_set(b)
    assert all(n > 0 for _, n in out)
    assert all(x + n * P < y for (x, n), (y, _) in zip(out, out[1:])), "sorted, disjoint, not adjacent"


def test_union_of_runs_past_64_bits_falls_back_to_python_integers():
    assert union([(2**70, 1)], [(2**70 + P, 2)]) == [(2**70, 3)]
    assert union([(2**64 - P, 1)], [(0, 1)]) == [(0, 1), (2**64 - P, 1)]


def test_layout_page_indices_and_translate_across_regions():
    src = MemoryLayout(1, P, (Region(0x10000, 4 * P), Region(0x100000, 2 * P)))
    dst = MemoryLayout(2, P, (Region(0x90000, 4 * P), Region(0x200000, 2 * P)))
    runs = [(0x10000 + P, 2), (0x100000 + P, 1)]
    assert src.page_indices(runs) == [(1, 2), (5, 1)]
    assert src.translate(runs, dst) == [(0x90000 + P, 2), (0x200000 + P, 1)]
    assert src.same_shape(dst)
    with pytest.raises(ValueError, match="outside the layout"):
        src.page_indices([(0x50000, 1)])


FLAT = MemoryLayout(pid=0, page_size=P, regions=(Region(0, 64 * P),))


def at(first: int, count: int) -> list[tuple[int, int]]:
    """The run of ``count`` pages from page ``first`` of FLAT."""
    return [(first * P, count)]


def test_page_digests_equal_iff_same_pages_at_same_indices():
    a, b = PageDigests(64), PageDigests(64)
    data = os.urandom(3 * P)
    a.record_runs(FLAT, at(2, 3), data)
    b.record_runs(FLAT, at(2, 1) + at(3, 2), data)
    assert a.value() == b.value()
    b.record_runs(FLAT, at(4, 1), bytes(P))          # a changed page differs
    assert a.value() != b.value()
    b.record_runs(FLAT, at(4, 1), data[2 * P :])     # re-sending the page restores equality
    assert a.value() == b.value()
    c = PageDigests(64)
    c.record_runs(FLAT, at(3, 3), data)               # same bytes, shifted by one page: differs
    assert c.value() != a.value()
    a.record_runs(FLAT, at(2, 3))
    assert a.value() == PageDigests(64).value()
    d = PageDigests(64)
    d.load(b.table)                        # a parent's table: the same digest as the table's owner
    assert d.value() == b.value() and d.table == b.table


def test_hashes_computed_while_moving_pages_record_like_the_pages_themselves():
    data = os.urandom(5 * P)
    a, b = PageDigests(64), PageDigests(64)
    a.record_runs(FLAT, at(2, 3) + at(9, 2), data)
    hashes = new_hashes(5)
    hash_pages_into(data, 5, P, hashes)
    b.record_hashes(FLAT, at(2, 3) + at(9, 2), hashes)
    assert a.value() == b.value() and a.table == b.table
    with pytest.raises(ValueError, match="4 hashes for 5 pages"):
        b.record_hashes(FLAT, at(2, 3) + at(9, 2), hashes[:4])
    with pytest.raises(ValueError, match="outside the layout"):
        b.record_hashes(FLAT, at(63, 2), hashes[:2])


def test_page_hashes_are_pinned_and_the_wide_pass_gives_the_scalar_hashes():
    """Images keep page hashes, so the hash may never change: pinned on two pages. The vector
    pass (on CPUs with AVX-512DQ) must give the scalar loop's hashes for any page count,
    including counts that leave pages for the scalar tail, and any buffer alignment."""
    pinned = new_hashes(2)
    hash_pages_into(bytes(range(256)) * 16 + bytes(P), 2, P, pinned)
    assert list(pinned) == [0x14FAAA66126F1C70, 0x0BF626E96E778CEB]
    rng = random.Random(8)
    raw = bytearray(rng.randbytes(41 * P + 8))
    for count in (1, 7, 8, 9, 16, 23, 40):
        for shift in (0, 8):
            view = memoryview(raw)[shift : shift + count * P]
            view[rng.randrange(len(view))] ^= 1 << rng.randrange(8)   # a flipped bit anywhere
            wide, scalar = new_hashes(count), new_hashes(count)
            hash_pages_into(view, count, P, wide)
            lib.hash_pages_scalar(ffi.from_buffer(view), count, P, ffi.from_buffer("uint64_t[]", scalar))
            assert wide == scalar, (count, shift)
            assert len(set(wide)) == count


def test_the_running_digest_equals_the_digest_of_the_table_from_scratch():
    """Kept up to date page by page, the digest is the one a fresh sum over the table gives."""
    rng = random.Random(5)
    a = PageDigests(64)
    for _ in range(200):
        first = rng.randrange(64)
        count = rng.randint(1, 64 - first)
        if rng.random() < 0.3:
            a.record_runs(FLAT, at(first, count))
        else:
            a.record_runs(FLAT, at(first, count), rng.randbytes(count * P))
    fresh = PageDigests(64)
    fresh.load(a.table)
    assert fresh.value() == a.value()


def test_region_digest_hashes_64_mib_pieces_on_any_number_of_threads():
    size = 2 * REGION_PIECE + 3 * 4096
    data = bytearray(size)
    data[::4096] = bytes(range(256)) * (size // 4096 // 256) + bytes(range(size // 4096 % 256))
    pieces = [data[o : o + n] for o, n in region_pieces(size)]
    assert [len(p) for p in pieces] == [REGION_PIECE, REGION_PIECE, 3 * 4096]
    expected = xxhash.xxh3_128_digest(b"".join(xxhash.xxh3_128_digest(p) for p in pieces))
    view = memoryview(data)
    for threads in (1, 2, 3):
        assert hash_region(size, lambda o, n: xxhash.xxh3_128_digest(view[o : o + n]), threads) == expected
    assert region_digest(data) == expected
    data[REGION_PIECE + 5] ^= 1
    assert region_digest(data) != expected


def test_region_digest_raises_what_a_piece_raised():
    def broken(offset, size):
        if offset:
            raise OSError(14, "Bad address")
        return b"x" * 16

    with pytest.raises(OSError, match="Bad address"):
        hash_region(3 * REGION_PIECE, broken, threads=2)


def test_region_digest_read_matches_the_digest_of_the_bytes():
    data = bytearray(os.urandom(3 * (1 << 20) + 8192))
    view = memoryview(data)

    def read(offset, out):
        out[:] = view[offset : offset + len(out)]

    assert region_digest_read(len(data), read, chunk=1 << 20) == region_digest(data)


def test_pages_are_indexed_across_regions_and_pages_outside_are_refused():
    """Page i of the second region is table entry 4 + i: the same as the flat layout's page 4 + i."""
    layout = MemoryLayout(pid=1, page_size=P, regions=(Region(0x10000, 4 * P), Region(0x80000, 6 * P)))
    runs = [(0x10000 + P, 2), (0x80000, 1), (0x80000 + 4 * P, 2)]
    data = os.urandom(5 * P)
    flat, regions = PageDigests(10), PageDigests(10)
    flat.record_runs(FLAT, at(1, 2) + at(4, 1) + at(8, 2), data)
    regions.record_runs(layout, runs, data)
    assert regions.table == flat.table and regions.value() == flat.value()
    flat.record_runs(FLAT, at(1, 2))
    regions.record_runs(layout, runs[:1])
    assert regions.table == flat.table and regions.value() == flat.value()
    for bad in ([(0x10000 + 3 * P, 2)], [(0x80000 - P, 1)], [(2**64 - P, 1)]):
        with pytest.raises(ValueError, match="outside the layout"):
            regions.record_runs(layout, bad, bytes(sum(n for _, n in bad) * P))
    with pytest.raises(ValueError, match="bytes for"):
        regions.record_runs(layout, runs, data[:-1])
