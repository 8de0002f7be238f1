"""The compiled workload in this process: determinism, self-check, patterns and fills."""

from __future__ import annotations

import array
import collections

import pytest
import xxhash
import zstandard

from migrator.core.errors import GuestError
from migrator.guest.layout import Geometry, Pattern, Settings, region_digest
from migrator.guest.mapping import RegionMapping
from migrator.guest.workload import CheckResult, Workload, check_pages_in
from migrator.core.model import PAGE_SIZE

SIZE = 4 << 20


def make(settings: Settings = Settings(seed=7), *, size: int = SIZE, memfd: bool = False) -> Workload:
    return Workload.create(RegionMapping(size, memfd=memfd), settings)


def copy_of(source: Workload, *, memfd: bool = False) -> Workload:
    """A second region holding the same bytes, at another address (as a restore guest gets it)."""
    target = Workload(RegionMapping(source.mapping.size, memfd=memfd))
    target.mapping.buffer[:] = source.mapping.buffer
    return target


def page(workload: Workload, index: int) -> memoryview:
    return workload.mapping.buffer[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]


def a_written_page(workload: Workload) -> int:
    """A data page some step wrote, other than the one the next step writes."""
    steps = workload.steps
    candidates = {workload.page_written_by(n) for n in range(steps - 50, steps)}
    return min(candidates - {workload.page_written_by(steps)})


@pytest.mark.parametrize("fill", ["random", "text", "sparse"])
@pytest.mark.parametrize("pattern", ["uniform", "hot:0.05:0.9", "sequential"])
def test_same_settings_and_steps_give_identical_regions_however_batched(fill, pattern):
    settings = Settings(Pattern.parse(pattern), fill, seed=11)
    one, other = make(settings), make(settings, memfd=True)
    one.run(30_000)
    for batch in (1, 999, 10_000, 19_000):
        other.run(batch)
    assert one.steps == other.steps == 30_000
    assert one.mapping.region.start != other.mapping.region.start
    assert one.digest() == other.digest()
    assert one.check().clean and other.check().clean


def test_seed_and_steps_change_the_region():
    base = make(Settings(seed=1))
    assert make(Settings(seed=2)).digest() != base.digest()
    before = base.digest()
    base.run(1)
    assert base.digest() != before


def test_a_copied_region_continues_exactly_like_the_original():
    original = make(Settings(Pattern.parse("hot:0.1:0.8"), "text", seed=5))
    original.run(12_345)
    copy = copy_of(original)
    assert copy.check().clean
    original.run(20_000)
    copy.run(20_000)
    assert copy.steps == original.steps
    assert copy.digest() == original.digest()


def test_a_copy_taken_in_the_middle_of_a_step_redoes_that_step_identically():
    original = make()
    original.run(5_000)
    copy = copy_of(original)
    # what a SIGSTOP between the in-flight marker and the commit leaves behind: the marker set,
    # the page's header and chunk half rewritten, the version table already updated
    ctl = copy._ctl
    ctl.in_flight = ctl.steps + 1
    victim = copy.page_written_by(ctl.steps)
    page(copy, victim)[:600] = bytes(range(200)) * 3
    table = Geometry.for_size(SIZE)
    copy.mapping.buffer[PAGE_SIZE + 8 * (victim - table.first_data_page) :][:8] = (ctl.steps + 1).to_bytes(8, "little")
    assert copy.check().clean, copy.check()
    original.run(7_000)
    copy.run(7_000)
    assert copy.digest() == original.digest()


def test_check_names_a_stale_page():
    workload = make()
    workload.run(20_000)
    victim = a_written_page(workload)
    old = bytes(page(workload, victim))
    while workload.page_written_by(workload.steps) != victim:
        workload.run(1)
    workload.run(1)
    assert workload.check().clean
    page(workload, victim)[:] = old
    for deep in (True, False):  # the shallow check (headers + table) catches it too
        result = workload.check(deep=deep)
        assert (result.clean, result.first_bad_page) == (False, victim)
        assert result.problem.startswith("stale page")


@pytest.mark.parametrize("offset", [0, 7, 8, 15, 16, 23, 24, 31])
def test_check_names_a_page_with_one_flipped_header_byte(offset):
    workload = make()
    workload.run(10_000)
    victim = a_written_page(workload)
    page(workload, victim)[offset] ^= 0x10
    for deep in (True, False):
        result = workload.check(deep=deep)
        assert (result.clean, result.first_bad_page) == (False, victim)
        assert "header corrupted" in result.problem


@pytest.mark.parametrize("fill", ["random", "text", "sparse"])
def test_check_names_a_page_with_one_flipped_body_byte(fill):
    workload = make(Settings(fill=fill))
    workload.run(10_000)
    victim = a_written_page(workload)
    for offset in (40, PAGE_SIZE - 1):   # in the rewritten chunk, and in the tail
        page(workload, victim)[offset] ^= 1
        result = workload.check()
        assert (result.clean, result.first_bad_page) == (False, victim)
        assert result.problem.startswith("page body differs")
        page(workload, victim)[offset] ^= 1
    assert workload.check().clean


def test_check_catches_a_wrong_version_table_and_a_zeroed_page():
    workload = make()
    workload.run(10_000)
    victim = a_written_page(workload)
    first = Geometry.for_size(SIZE).first_data_page
    entry = slice(PAGE_SIZE + 8 * (victim - first), PAGE_SIZE + 8 * (victim - first) + 8)
    good = bytes(workload.mapping.buffer[entry])
    workload.mapping.buffer[entry] = (workload.steps + 5).to_bytes(8, "little")
    assert workload.check().problem.startswith("version table says step")
    workload.mapping.buffer[entry] = good
    page(workload, victim)[:] = bytes(PAGE_SIZE)
    result = workload.check()
    assert (result.first_bad_page, result.problem.split(" (")[0]) == (victim, "page header missing")


def test_check_and_validate_reject_a_damaged_control_block():
    workload = make()
    workload.run(100)
    workload.mapping.buffer[40] ^= 1   # inside the seed
    assert workload.check() == CheckResult(False, 0, "control block: settings checksum mismatch")
    with pytest.raises(GuestError, match="checksum"):
        workload.validate()


def test_an_empty_or_wrong_sized_region_cannot_be_resumed():
    with pytest.raises(GuestError, match="bad magic"):
        Workload(RegionMapping(SIZE)).validate()
    small = make(size=1 << 20)
    bigger = Workload(RegionMapping(2 << 20))
    bigger.mapping.buffer[: 1 << 20] = small.mapping.buffer
    with pytest.raises(GuestError, match="describes 256 pages, but the region has 512"):
        bigger.validate()


def test_tag_lives_in_the_region():
    workload = make()
    before = workload.digest()
    workload.set_tag("image-42 ✓")
    assert workload.tag == "image-42 ✓"
    assert workload.digest() != before
    assert copy_of(workload).tag == "image-42 ✓"
    workload.set_tag("")
    assert workload.digest() == before
    with pytest.raises(GuestError, match="at most 200 bytes"):
        workload.set_tag("x" * 201)


def test_sequential_pattern_walks_the_data_pages():
    workload = make(Settings(Pattern.parse("sequential")))
    geometry = Geometry.for_size(SIZE)
    picks = [workload.page_written_by(n) for n in (0, 1, geometry.data_pages - 1, geometry.data_pages)]
    first = geometry.first_data_page
    assert picks == [first, first + 1, first + geometry.data_pages - 1, first]


def test_hot_pattern_sends_its_share_of_writes_to_its_fraction_of_pages():
    workload = make(Settings(Pattern.parse("hot:0.05:0.9")))
    data_pages = Geometry.for_size(SIZE).data_pages
    counts = collections.Counter(workload.page_written_by(n) for n in range(40_000))
    hot = round(0.05 * data_pages)
    hottest = sum(c for _, c in counts.most_common(hot))
    assert 0.87 < hottest / 40_000 < 0.93
    assert len(counts) > 0.9 * data_pages   # the cold writes still reach (almost) every page


def test_uniform_pattern_spreads_writes():
    workload = make()
    data_pages = Geometry.for_size(SIZE).data_pages
    counts = collections.Counter(workload.page_written_by(n) for n in range(10 * data_pages))
    assert len(counts) > 0.99 * data_pages
    assert max(counts.values()) < 30


def _ratio(buffer) -> float:
    data = bytes(buffer)
    return len(data) / len(zstandard.ZstdCompressor(level=1).compress(data))


def test_fills_compress_like_their_kind_of_data():
    ratios = {}
    for fill in ("random", "text", "sparse"):
        workload = make(Settings(fill=fill), size=2 << 20)
        workload.run(5_000)
        ratios[fill] = _ratio(workload.mapping.buffer)
    assert ratios["random"] < 1.05
    assert 2 < ratios["text"] < 8
    assert ratios["sparse"] > 20


def test_sparse_fill_leaves_most_pages_zero():
    workload = make(Settings(fill="sparse"))
    buffer = workload.mapping.buffer
    zero = bytes(PAGE_SIZE)
    pages = SIZE // PAGE_SIZE
    zero_pages = sum(buffer[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == zero for i in range(pages))
    assert zero_pages > 0.85 * pages


def test_region_digest_is_the_hash_list_of_the_bytes():
    workload = make(size=1 << 20)
    data = bytes(workload.mapping.buffer)
    one_piece = xxhash.xxh3_128_hexdigest(xxhash.xxh3_128_digest(data))
    assert workload.digest() == region_digest(data) == one_piece


def test_a_check_of_listed_pages_sees_them_and_only_them():
    """What a downtime checks: the final copy's pages, whatever the region's size."""
    workload = make()
    workload.run(10_000)
    victim = a_written_page(workload)
    first = Geometry.for_size(SIZE).first_data_page
    table_page = 1 + 8 * (victim - first) // PAGE_SIZE
    page(workload, victim)[3] ^= 0x10
    as_runs = lambda *runs: array.array("Q", [n for run in runs for n in run]).tobytes()   # noqa: E731
    listed = workload.check_pages(as_runs((victim - 2, 5)))
    assert (listed.clean, listed.first_bad_page) == (False, victim) and "header corrupted" in listed.problem
    elsewhere = bytearray(workload.mapping.buffer)     # the region as another process maps it (a receiver)
    assert check_pages_in(elsewhere, as_runs((victim - 2, 5))) == listed
    assert check_pages_in(elsewhere, as_runs((0, 1), (victim + 1, 3))).clean
    assert not check_pages_in(elsewhere, as_runs((SIZE // PAGE_SIZE - 1, 2))).clean
    assert workload.check_pages(as_runs((table_page, 1))).clean            # table pages: the digest's
    assert workload.check_pages(as_runs((0, 1), (victim + 1, 3))).clean      # not listed: not looked at
    assert workload.check_pages(b"").clean
    outside = workload.check_pages(as_runs((SIZE // PAGE_SIZE - 1, 2)))
    assert not outside.clean and "outside the region" in outside.problem
    assert not workload.check_pages(as_runs((5, 2**64 - 2))).clean          # a count that wraps around
    page(workload, victim)[3] ^= 0x10
    assert workload.check_pages(as_runs((0, SIZE // PAGE_SIZE))).clean
