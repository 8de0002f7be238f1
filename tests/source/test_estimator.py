"""The downtime model with hand-computed values."""

import dataclasses

import pytest

from migrator.core.errors import MigratorError
from migrator.source.estimator import DowntimeEstimator, FREEZE_MS, LOCAL_CALLS_MS, SWITCHOVER_EXCHANGES


def test_defaults_before_any_round():
    est = DowntimeEstimator()
    assert est.expected_ms(0) == 1.0                       # the fixed part
    assert est.expected_ms(1000) == pytest.approx(4.0)     # 1 ms + 1000 x 3 us
    assert est.statistics().source == "default"


def test_later_round_sets_the_cost_per_page():
    est = DowntimeEstimator(fixed_ms=0.5)
    est.observe(1000, 0.005)                               # 5 us per page
    assert est.expected_ms(2000) == pytest.approx(0.5 + 10.0)
    stats = est.statistics()
    assert (stats.source, stats.observations, stats.per_page_ms) == ("rounds", 1, pytest.approx(0.005))


def test_round_zero_stands_in_with_a_penalty_until_a_later_round_is_seen():
    est = DowntimeEstimator()
    est.observe(262144, 0.5, round0=True)                  # 500 ms / 262144 pages = 1.9073 us/page
    assert est.statistics().source == "round-0"
    assert est.expected_ms(1000) == pytest.approx(1.0 + 1000 * 0.5e3 / 262144 * 1.5)   # 3.861 ms
    est.observe(1000, 0.004)
    assert est.expected_ms(1000) == pytest.approx(5.0)     # the later round alone: 4 us/page
    assert est.statistics().source == "rounds"


def test_tiny_rounds_are_ignored():
    est = DowntimeEstimator()
    est.observe(100, 1.0)                                  # 10 ms/page of overhead and noise
    assert est.expected_ms(1000) == pytest.approx(4.0)
    assert est.statistics().observations == 0


def test_a_recent_slow_round_counts_fully_then_ages_out():
    est = DowntimeEstimator(fixed_ms=0.0)
    est.observe(1000, 0.010)                               # 10 us/page outlier
    est.observe(1000, 0.002)                               # weights 1 and .75: the outlier is above 90 %
    assert est.statistics().per_page_ms == pytest.approx(0.010)
    for cost_ms in (0.003, 0.002, 0.0025, 0.002):          # 1000 pages in `cost_ms` seconds
        est.observe(1000, cost_ms)
    # Weights newest first: 1, .75, .5625, .421875, .31640625, then the outlier .2373046875;
    # total 3.2880859375, 90 % = 2.959. Ascending: 0.002 x3 (1.8789), 0.0025 (2.6289),
    # 0.003 (3.0508 >= 2.959): the estimate is 3 us/page, the outlier no longer counts.
    assert est.statistics().per_page_ms == pytest.approx(0.003)
    assert est.expected_ms(1000) == pytest.approx(3.0)


def test_bandwidth_cap_is_a_floor_on_the_cost_per_page():
    est = DowntimeEstimator(bandwidth=4096e3)              # 4,096,000 B/s: 1 ms per 4 KiB page
    est.observe(1000, 0.002)
    assert est.statistics().floor_per_page_ms == pytest.approx(1.0)
    assert est.expected_ms(10) == pytest.approx(1.0 + 10.0)
    assert DowntimeEstimator(bandwidth=1e9).expected_ms(1000) == pytest.approx(1.0 + 4.096)


def test_a_new_cap_moves_the_floor():
    est = DowntimeEstimator(bandwidth=4096e3)              # 1 ms per page
    est.observe(1000, 0.002)                               # 2 us per page measured
    est.set_bandwidth(4096e2)                              # `migrator set bandwidth=`: 10 ms per page
    assert est.statistics().floor_per_page_ms == pytest.approx(10.0)
    assert est.expected_ms(10) == pytest.approx(1.0 + 100.0)
    est.set_bandwidth(None)                                # unlimited: the measured cost alone
    assert est.statistics().floor_per_page_ms == 0.0 and est.expected_ms(1000) == pytest.approx(3.0)
    with pytest.raises(MigratorError):
        est.set_bandwidth(0)


def test_never_negative_and_frozen_statistics():
    est = DowntimeEstimator()
    est.observe(1000, 0.0)
    assert est.expected_ms(1000) == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.statistics().fixed_ms = 0.0


def test_bad_input():
    with pytest.raises(MigratorError, match="bandwidth must be > 0"):
        DowntimeEstimator(bandwidth=0)
    with pytest.raises(MigratorError, match="costs must be >= 0"):
        DowntimeEstimator(fixed_ms=-1)
    with pytest.raises(ValueError, match="pages >= 0"):
        DowntimeEstimator().observe(-1, 0.1)
    with pytest.raises(ValueError, match="pages must be >= 0"):
        DowntimeEstimator().expected_ms(-1)


def test_the_fixed_part_is_learned_from_the_scan_and_the_quickest_exchange():
    est = DowntimeEstimator(fixed_ms=30.0)
    assert est.statistics().fixed_source == "prior" and est.expected_ms(0) == 30.0
    est.observe_scan(0.002)
    assert est.expected_ms(0) == 30.0                      # a scan alone: still the prior
    est.observe_exchange(0.009)                            # round 0's Ack, behind its apply backlog
    est.observe_exchange(0.0015)
    est.observe_exchange(0.004)
    stats = est.statistics()
    assert (stats.fixed_source, stats.scan_ms, stats.exchange_ms) == ("measured", 2.0, 1.5)
    assert stats.fixed_ms == pytest.approx(FREEZE_MS + LOCAL_CALLS_MS + 2.0 + SWITCHOVER_EXCHANGES * 1.5)
    est.observe_scan(0.001)                                # the latest scan counts, not the slowest
    assert est.statistics().fixed_ms == pytest.approx(FREEZE_MS + LOCAL_CALLS_MS + 1.0 + SWITCHOVER_EXCHANGES * 1.5)
    with pytest.raises(ValueError):
        est.observe_exchange(-1)


def test_a_rounds_share_of_the_exchange_is_not_charged_to_its_pages():
    est = DowntimeEstimator()
    est.observe_exchange(0.002)
    est.observe(1000, 0.005)                               # 3 ms of pages + its 2 ms exchange
    assert est.statistics().per_page_ms == pytest.approx(0.003)
