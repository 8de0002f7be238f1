"""Pacing, batch sizing and the rate meter, driven by a fake clock."""

from __future__ import annotations

import pytest

from migrator.guest.pacing import MAX_DEBT_SECONDS, BatchSizer, Pacer, RateMeter, StopClock


def run_paced(pacer: Pacer, start: float, seconds: float, tick: float, stalls: dict[int, float] = {}) -> int:
    """Simulate a writer that wakes every ``tick`` (plus stalls) and does what is due."""
    now, done, i = start, 0, 0
    while now < start + seconds:
        due = pacer.due(now)
        pacer.record(due)
        done += due
        now += tick + stalls.get(i, 0.0)
        i += 1
    return done


@pytest.mark.parametrize("rate", [50.0, 20_000.0, 1_000_000.0])
@pytest.mark.parametrize("tick", [0.0003, 0.001, 0.0137])
def test_pacer_holds_the_rate_by_the_wall_clock(rate, tick):
    pacer = Pacer(rate, start=100.0)
    done = run_paced(pacer, 100.0, 2.0, tick)
    assert abs(done - rate * 2.0) <= rate * tick + 1


def test_pacer_forgives_debt_beyond_max_debt_after_a_stop():
    rate = 10_000.0
    pacer = Pacer(rate, start=0.0)
    pacer.record(pacer.due(1.0))
    owed = pacer.due(6.0)   # stopped 5 s: only 100 ms worth owed (after the step due first)
    assert owed == int(rate * MAX_DEBT_SECONDS) + 1
    pacer.record(owed)
    assert pacer.due(6.001) == pytest.approx(rate * 0.001, abs=1)   # then the plain rate again


def test_pacer_seconds_until_due():
    pacer = Pacer(1000.0, start=0.0)
    assert pacer.due(0.0) == 0
    assert pacer.seconds_until_due(0.0) == pytest.approx(0.001)
    assert pacer.due(0.0105) == 10
    pacer.record(10)
    assert pacer.seconds_until_due(0.0105) == pytest.approx(0.0005)


def test_batch_sizer_aims_at_a_millisecond_per_call():
    sizer = BatchSizer(target=0.001)
    for _ in range(20):
        sizer.observe(sizer.size, sizer.size * 250e-9)   # 250 ns per step
    assert sizer.size == pytest.approx(4000, rel=0.01)
    for _ in range(20):
        sizer.observe(sizer.size, sizer.size * 1e-3)     # a step blocked for 1 ms each
    assert sizer.size == 1


def test_rate_meter_measures_the_last_window():
    meter = RateMeter(window=1.0)
    for i in range(300):                         # 1000 steps/s for 3 s, sampled every 10 ms
        meter.record(i * 0.01, i * 10)
    assert meter.rate(2.99, 2990) == pytest.approx(1000, rel=0.02)
    assert meter.rate(5.0, 2990) == 0.0          # nothing written since: the rate falls to zero
    assert RateMeter().rate(1.0, 5) == 0.0


def test_pacer_forgives_the_time_it_was_stopped():
    pacer = Pacer(1000.0, start=0.0)
    pacer.record(pacer.due(1.0))
    pacer.forgive(0.4)                       # stopped for 0.4 s of the next 0.5 s
    assert pacer.due(1.5) == pytest.approx(100, abs=1)


def test_stop_clock_counts_only_time_neither_running_waiting_nor_sleeping():
    clock = StopClock()
    assert clock.stopped(10.0, 1.0, 0.5) == 0.0                      # first reading: no interval yet
    assert clock.stopped(10.010, 1.006, 0.504) == 0.0                # ran 6 ms, waited 4 ms for a CPU
    assert clock.stopped(10.030, 1.010, 0.504, slept=0.006) == pytest.approx(0.010)   # 10 ms stopped
    assert clock.stopped(10.0302, 1.0101, 0.504) == 0.0              # sub-threshold noise
