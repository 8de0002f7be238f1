"""Post-copy's page-state table (migrator.core.pagestate and the C behind it), on bytes."""

import errno
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrator.core.model import MemoryLayout, Region
from migrator.core.pagestate import PageStates, page_index_pairs
from migrator.native.pages import ffi, lib

P = 4096
A, B = 0x10000000, 0x20000000        # two regions: 8 pages at A (indices 0-7), 4 at B (8-11)
LAYOUT = MemoryLayout(1, P, (Region(A, 8 * P), Region(B, 4 * P)))


@pytest.fixture
def states():
    return PageStates(LAYOUT)


def test_set_marks_the_pages_of_runs_across_regions_and_counts_changes(states):
    assert states.set([(A + P, 2), (B + 3 * P, 1)], 1) == 3
    assert bytes(states.table) == bytes([0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert states.set([(A, 3)], 1) == 1                 # two of the three were 1 already
    assert states.count(1) == 4 and states.count(0) == 8
    assert states.value_at(A + 2 * P + 123) == 1 and states.value_at(B) == 0


def test_claim_moves_only_pages_in_the_from_state_and_coalesces(states):
    states.set([(A, 8), (B, 4)], 1)
    states.set([(A + 3 * P, 1)], 0)
    # the runs touch across A+2P|A+4P: claimed pages 0-2 and 4-7 stay two runs, B's a third
    assert states.claim([(A, 3), (A + 3 * P, 5), (B, 4)], 1, 2) == [(A, 3), (A + 4 * P, 4), (B, 4)]
    assert bytes(states.table) == bytes([2, 2, 2, 0, 2, 2, 2, 2, 2, 2, 2, 2])
    assert states.claim([(A, 8)], 1, 2) == []          # claimed once only
    assert states.claim([(A + P, 1), (A + 2 * P, 2)], 2, 0) == [(A + P, 2)]   # adjacent runs merge


def test_claim_of_overlapping_runs_claims_each_page_once(states):
    states.set([(A, 8)], 1)
    assert states.claim([(A, 4), (A + 2 * P, 4), (A, 8)], 1, 2) == [(A, 8)]   # 0-3, 4-5, 6-7: one run
    states.set([(A, 8)], 1)
    assert states.claim([(A + 4 * P, 4), (A, 8)], 1, 2) == [(A + 4 * P, 4), (A, 4)]   # in visiting order


HOSTILE = [
    (A - P, 1),                      # before the first region
    (A + 7 * P, 2),                  # runs past the first region's end
    (A + 8 * P, 1),                  # in the gap between the regions
    (B + 4 * P, 1),                  # past the last
    (A + 1, 1),                      # unaligned
    (A, (1 << 64) // P),             # address + count * page_size overflows 64 bits
    ((1 << 64) - P, 2),              # so does this one
    (-P, 1),                         # not a 64-bit address at all
    (A, 1 << 64),
]


@pytest.mark.parametrize("bad", HOSTILE)
def test_a_run_outside_the_layout_is_refused_by_name_and_changes_nothing(states, bad):
    states.set([(A, 2)], 1)
    before = bytes(states.table)
    for call in (lambda runs: states.set(runs, 2), lambda runs: states.claim(runs, 1, 2)):
        with pytest.raises(OSError) as info:
            call([(A + P, 1), bad])                  # a good run first: it must not be applied either
        assert info.value.errno == errno.EFAULT and f"{bad[0]:#x}" in str(info.value)
        assert bytes(states.table) == before


def test_runs_of_no_pages_are_accepted_anywhere_and_do_nothing(states):
    assert states.set([(A - P, 0), (B + 99 * P, 0), (A, 0)], 1) == 0
    assert states.claim([((1 << 64) - 1, 0)], 0, 1) == []
    assert states.count(0) == LAYOUT.total_pages


def test_value_at_outside_and_bad_state_values(states):
    with pytest.raises(OSError, match="outside the layout"):
        states.value_at(B + 4 * P)
    for value in (-1, 256, True):
        with pytest.raises(ValueError):
            states.set([(A, 1)], value)
    with pytest.raises(ValueError, match="same state"):
        states.claim([(A, 1)], 1, 1)


def test_c_claim_writes_nothing_past_out_and_reports_no_room(states):
    # out has room for two pairs; three scattered pages would need three
    states.set([(A, 1), (A + 2 * P, 1), (A + 4 * P, 1)], 1)
    out = ffi.new("uint64_t[]", 6)
    out[4] = out[5] = 0xDEAD
    runs = ffi.new("uint64_t[]", [A, 8])
    assert lib.runs_claim(*states.c_arguments(), runs, 1, 1, 2, out, 2) == lib.RUNS_NO_ROOM
    assert (out[4], out[5]) == (0xDEAD, 0xDEAD)
    assert list(out)[:4] == [A, 1, A + 2 * P, 1]
    assert bytes(states.table[:6]) == bytes([2, 0, 2, 0, 1, 0])   # exactly the pages in out changed


def test_c_checks_a_table_shorter_than_the_regions_say(states):
    runs = ffi.new("uint64_t[]", [B, 4])
    state, _n, regions, nregions, ps = states.c_arguments()
    assert lib.runs_outside(regions, nregions, ps, 10, runs, 1) == 0      # indices 8-11 in a table of 10
    assert lib.runs_outside(regions, nregions, ps, 12, runs, 1) == 1
    assert lib.runs_outside(regions, nregions, 0, 12, runs, 1) == 0       # no page size: nothing fits


@given(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 12)), max_size=12), st.integers(0, 2 ** 12 - 1))
def test_claim_matches_a_page_by_page_model(raw, missing):
    states = PageStates(LAYOUT)
    index = [A + i * P for i in range(8)] + [B + i * P for i in range(4)]
    states.set([(index[i], 1) for i in range(12) if missing >> i & 1], 1)
    model = list(states.table)
    runs = [(index[i], n) for i, n in raw]
    inside = all(n == 0 or (i < 8 and i + n <= 8) or (i >= 8 and i + n <= 12) for i, n in raw)
    if not inside:
        with pytest.raises(OSError):
            states.claim(runs, 1, 2)
        assert list(states.table) == model
        return
    claimed = []
    for i, n in raw:
        for k in range(i, i + n):
            if model[k] == 1:
                model[k] = 2
                claimed.append(index[k])
    got = states.claim(runs, 1, 2)
    assert [a + k * P for a, n in got for k in range(n)] == claimed
    assert all(a + n * P != b for (a, n), (b, _) in zip(got, got[1:]))   # coalesced
    assert list(states.table) == model


def test_page_index_pairs_count_pages_across_regions_as_the_layout_does():
    runs = [(A, 2), (A + 7 * P, 1), (B, 4), (B + 2 * P, 1)]
    raw = page_index_pairs(LAYOUT, runs)
    assert array("Q", raw).tolist() == [v for pair in LAYOUT.page_indices(runs) for v in pair]
    assert page_index_pairs(LAYOUT, []) == b""
    for bad in HOSTILE:
        with pytest.raises(OSError) as info:
            page_index_pairs(LAYOUT, [(A, 1), bad])
        assert info.value.errno == errno.EFAULT
