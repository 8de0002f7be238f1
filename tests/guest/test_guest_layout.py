"""Pure layout values: sizes, geometry, patterns, settings."""

from __future__ import annotations

import math

import pytest

from migrator.guest.layout import Geometry, Pattern, Settings, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("64M", 64 << 20), ("1G", 1 << 30), ("1GiB", 1 << 30), ("512k", 512 << 10), ("65536", 65536)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1X", "-4M", "4097", "8K", "1.5G"])
def test_parse_size_rejects_with_a_message(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize("pages", [16, 17, 513, 514, 515, 1026, 1027, 262_144, 262_145])
def test_geometry_is_the_fewest_table_pages_that_index_every_data_page(pages):
    g = Geometry.for_size(pages * 4096)
    assert 1 + g.table_pages + g.data_pages == g.region_pages == pages
    assert g.table_pages * 512 >= g.data_pages
    assert (g.table_pages - 1) * 512 < g.data_pages + 1   # one table page fewer would not do
    assert g.first_data_page == 1 + g.table_pages


@pytest.mark.parametrize(
    ("text", "value"),
    [("uniform", Pattern("uniform")), ("sequential", Pattern("sequential")), ("hot:0.05:0.9", Pattern("hot", 0.05, 0.9))],
)
def test_pattern_parse_and_str_round_trip(text, value):
    assert Pattern.parse(text) == value
    assert str(value) == text


@pytest.mark.parametrize("text", ["random", "hot", "hot:0.05", "hot:0:0.9", "hot:1:0.9", "hot:0.1:1.5", "uniform:3", "hot:a:b"])
def test_pattern_rejects_with_a_message(text):
    with pytest.raises(ValueError, match="pattern"):
        Pattern.parse(text)


@pytest.mark.parametrize("data_pages", [15, 64, 1000, 65_535, 262_080])
def test_hot_set_is_a_permutation_of_the_data_pages(data_pages):
    hot, threshold, stride = Pattern("hot", 0.05, 0.9).hot_parameters(data_pages)
    assert 1 <= hot < data_pages
    assert math.gcd(stride, data_pages) == 1
    assert threshold == int(0.9 * 2**64)
    if data_pages <= 1000:
        assert sorted(r * stride % data_pages for r in range(data_pages)) == list(range(data_pages))


def test_settings_validate():
    with pytest.raises(ValueError, match="fill"):
        Settings(fill="zeros")
    with pytest.raises(ValueError, match="seed"):
        Settings(seed=-1)
    with pytest.raises(ValueError, match="dirty rate"):
        Settings(dirty_rate=0)
    assert Settings(dirty_rate=None).dirty_rate is None
