"""The classic pre-copy model against values computed by hand."""

from __future__ import annotations

import math

import pytest

from migrator.core.errors import MigratorError
from migrator.experiment import classic_model as model


def test_ratio_is_dirty_rate_over_bandwidth():
    assert model.ratio(50, 100) == 0.5
    assert model.ratio(300, 100) == 3.0
    with pytest.raises(MigratorError, match="bandwidth > 0"):
        model.ratio(1, 0)


def test_classic_rounds_shrink_geometrically():
    assert model.classic_pages(1000, 0.5, 4) == [1000, 500, 250, 125]
    assert model.classic_pages(1000, 0.5, 0) == []


def test_hot_set_caps_every_round_after_the_first():
    # r >= 1 would grow without bound; the hot set holds it at 300 pages
    assert model.classic_pages(1000, 2.0, 4, hot_pages=300) == [1000, 300, 300, 300]
    # r < 1: the cap only bites while r * V_i is above it
    assert model.classic_pages(1000, 0.5, 4, hot_pages=300) == [1000, 300, 150, 75]


def test_rounds_to_converge_closed_form():
    # 1000 * 0.5**3 = 125 > 100, 1000 * 0.5**4 = 62.5 <= 100: rounds 0..3 run
    assert model.rounds_to_converge(1000, 0.5, 100) == 4
    assert model.rounds_to_converge(1000, 0.5, 125) == 3     # exactly on the threshold
    assert model.rounds_to_converge(100, 2.0, 300) == 1      # round 0 is always run
    assert model.rounds_to_converge(1000, 1.0, 100) == math.inf
    assert model.rounds_to_converge(1000, 1.5, 100) == math.inf


def test_predict_converging_run():
    # r = 50 / 100 = 0.5, stop at 100 pages
    p = model.predict(1000, 50, 100, stop_at=100, max_rounds=10)
    assert p.pages == (1000, 500, 250, 125)
    assert p.final_pages == 62.5
    assert p.converged and p.rounds == 4
    assert p.total_pages == 1937.5
    assert p.downtime_s(100, fixed_s=0.002) == pytest.approx(0.627)


def test_predict_with_a_slow_first_round():
    # round 0 takes 4 s instead of 1000 / 100 = 10 s: 50 * 4 = 200 pages, then 50 * 200 / 100 = 100
    p = model.predict(1000, 50, 100, stop_at=100, max_rounds=10, first_round_s=4)
    assert p.pages == (1000, 200) and p.final_pages == 100 and p.converged


def test_predict_diverging_run_stops_at_the_round_limit():
    p = model.predict(1000, 200, 100, stop_at=100, max_rounds=3)
    assert p.pages == (1000, 2000, 4000)
    assert p.final_pages == 8000
    assert not p.converged


def test_predict_with_a_hot_set_plateau():
    def hot(writes):
        return min(writes, 300)

    stalled = model.predict(1000, 200, 100, stop_at=100, max_rounds=3, dirtied=hot)
    assert stalled.pages == (1000, 300, 300) and stalled.final_pages == 300 and not stalled.converged
    small_enough = model.predict(1000, 200, 100, stop_at=300, max_rounds=3, dirtied=hot)
    assert small_enough.pages == (1000,) and small_enough.final_pages == 300 and small_enough.converged


def test_predict_agrees_with_the_closed_form():
    for r in (0.05, 0.3, 0.5, 0.77, 0.9, 0.99):
        p = model.predict(16384, r * 1000, 1000, stop_at=64, max_rounds=10_000)
        assert p.rounds == model.rounds_to_converge(16384, r, 64), r


def test_distinct_pages_per_pattern():
    # N (1 - (1 - 1/N)**w): 4 pages, 2 writes -> 4 * (1 - 9/16) = 1.75
    assert model.dirty_pages(2, 4, "uniform") == pytest.approx(1.75)
    # 1000 pages, 1000 writes -> 1000 * (1 - 0.999**1000) = 632.305
    assert model.dirty_pages(1000, 1000, "uniform") == pytest.approx(632.305, abs=1e-3)
    assert model.dirty_pages(10, 1000, "sequential") == 10
    assert model.dirty_pages(1500, 1000, "sequential") == 1000
    assert model.dirty_pages(1500, 1000, "classic") == 1500
    # hot:0.25:0.5 on 8 pages: 2 hot pages get 2 writes (2 * 3/4 = 1.5),
    # 6 cold pages get 2 writes (6 * (1 - 25/36) = 11/6)
    assert model.dirty_pages(4, 8, "hot:0.25:0.5") == pytest.approx(1.5 + 11 / 6)
    assert model.dirty_pages(0, 8, "uniform") == 0


def test_hot_set_size_matches_the_guest():
    assert model.hot_set_pages("hot:0.05:0.9", 16384) == 819
    assert model.hot_set_pages("uniform", 16384) is None


def test_stop_threshold_from_the_downtime_target():
    # (10 ms - 2 ms) at 100,000 pages/s = 800 pages; at 1000 pages/s only 8, so min-pages (64)
    assert model.stop_pages(0.010, 100_000, fixed_s=0.002) == pytest.approx(800)
    assert model.stop_pages(0.010, 1000, fixed_s=0.002) == 64


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: model.dirty_pages(1, 10, "zigzag"), "expected classic, uniform"),
        (lambda: model.dirty_pages(1, 10, "hot:2:0.5"), "0 < FRACTION < 1"),
        (lambda: model.dirty_pages(-1, 10, "uniform"), "writes >= 0"),
        (lambda: model.predict(10, 1, 0, stop_at=1, max_rounds=3), "bandwidth > 0"),
        (lambda: model.classic_pages(-1, 0.5, 3), "volume, r, rounds >= 0"),
    ],
)
def test_bad_input_is_one_typed_line(call, message):
    with pytest.raises(MigratorError, match=message):
        call()
