"""``predict``: the trace-driven pre-copy simulation against hand-worked cases.

Every trace here has one mapping of 1000 pages and intervals of 1 s; bandwidths are in pages/s,
the switch-over rule fires at 64 pages (``classic_model.MIN_PAGES``) unless the downtime allows
more. The expected rounds were worked out by hand in the comments.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from migrator.core.errors import MigratorError
from migrator.trace.file import write_trace
from migrator.trace.model import TraceMapping, TraceRecorder
from migrator.trace.predict import Timeline, compare, simulate

PAGE = 4096
REGION = TraceMapping(0x100000, 0x100000 + 1000 * PAGE, "")


def trace_of(*page_sets):
    """One 1-second interval per set of page offsets written."""
    recorder = TraceRecorder(page_size=PAGE, pid=1, command="", interval_s=1.0, stopped_ms=0.0)
    for k, pages in enumerate(page_sets):
        runs = [(REGION.start + p * PAGE, 1) for p in sorted(pages)]
        recorder.add(float(k + 1), 1.0, [REGION], [(REGION, runs)] if runs else [])
    return recorder.trace()


DISJOINT = trace_of(*(range(100 * k, 100 * k + 100) for k in range(10)))   # 100 new pages each second
HOT = trace_of(*(range(300) for _ in range(10)))                           # the same 300 pages each second
QUIET = trace_of(*(range(50) for _ in range(10)))                          # the same 50 pages each second

CASES = [
    # name, trace, bandwidth, max_rounds, pages sent per round, final pages, converged
    # round 0: 1000 pages in 10 s; the whole trace wrote 50 distinct pages <= 64: stop
    ("quiet converges after round 0", QUIET, 100.0, 30, (1000,), 50, True),
    # 1000 in 5 s -> intervals 0-4 = 500; 500 in 2.5 s -> 5, 6 and half of 7 = 250;
    # 250 in 1.25 s -> half of 7, 3/4 of 8 = 125; 125 in 0.625 s -> 1/4 of 8, 3/8 of 9 = 62.5 <= 64
    ("disjoint halves each round", DISJOINT, 200.0, 30, (1000, 500, 250, 125), 62.5, True),
    # the hot set: every window of 3 s or more holds the same 300 pages, never <= 64
    ("hot set never converges", HOT, 100.0, 5, (1000, 300, 300, 300, 300), 300, False),
    # 1000 in 1 s -> interval 0 = 100 pages; 100 in 0.1 s -> a tenth of interval 1 = 10 <= 64
    ("fast link", DISJOINT, 1000.0, 30, (1000, 100), 10, True),
]


@pytest.mark.parametrize("name, trace, bandwidth, max_rounds, pages, final, converged", CASES, ids=[c[0] for c in CASES])
def test_hand_worked_cases(name, trace, bandwidth, max_rounds, pages, final, converged):
    prediction = simulate(trace, bandwidth, stop_at=64, max_rounds=max_rounds)
    assert prediction.pages == pytest.approx(pages)
    assert prediction.final_pages == pytest.approx(final)
    assert prediction.converged is converged


def test_windows_loop_and_count_partial_intervals_pro_rata():
    two = trace_of(range(10), range(10, 20))
    timeline = Timeline(two)
    assert timeline.written(0, 1) == 10
    assert timeline.written(0.5, 1.5) == pytest.approx(10)     # half of each
    assert timeline.written(1.5, 2.5) == pytest.approx(10)     # half of 1, then half of 0 after the loop
    assert timeline.written(0, 2) == 20 and timeline.written(3, 10) == 20
    hot = Timeline(trace_of(range(10), range(10)))
    # no interval in full: each page written in the window's half of interval 0 or of interval
    # 1, each with probability 1/2 independently: 10 * (1 - 1/4)
    assert hot.written(0.5, 1.5) == pytest.approx(7.5)
    assert hot.written(0, 1.5) == pytest.approx(10)             # interval 0 full; interval 1 adds nothing new
    overlapping = Timeline(trace_of(range(10), range(5, 15), range(20, 30)))
    # a quarter of interval 0 (pages 0-9), all of 1 (5-14), half of 2 (20-29): 10 + 5/4 + 5
    assert overlapping.written(0.75, 2.5) == pytest.approx(10 + 1.25 + 5)
    # wrapping round the loop: 0.4 of interval 2 and 0.6 of interval 0, disjoint: 4 + 6
    assert overlapping.written(2.6, 3.6) == pytest.approx(10)


def test_disjoint_writes_agree_with_the_classic_model():
    # 100 distinct new pages/s is exactly the classic rule's assumption: the two agree round by round
    result = compare(DISJOINT, 200.0 * PAGE, downtime_s=0.001, max_rounds=30)
    assert result.dirty_rate == pytest.approx(100)
    assert result.trace.pages == pytest.approx(result.classic.pages)
    assert result.trace.final_pages == pytest.approx(result.classic.final_pages)


def test_a_hot_set_makes_the_classic_model_pessimistic():
    result = compare(HOT, 1000.0 * PAGE, downtime_s=0.001, max_rounds=5)
    # classic: 300 pages/s over 1000 pages/s: r = 0.3, 1000, 300, 90, then 27 <= 64
    assert result.classic.pages == pytest.approx((1000, 300, 90)) and result.classic.converged
    # the trace: a 1 s window holds the 300 hot pages, a 0.3 s one 30 % of them, then 27 pages
    assert result.trace.pages == pytest.approx((1000, 300, 90)) and result.trace.converged
    slow = compare(HOT, 100.0 * PAGE, downtime_s=0.001, max_rounds=5)
    assert not slow.trace.converged and not slow.classic.converged
    assert slow.trace.total_pages < slow.classic.total_pages


def test_an_empty_trace_is_refused():
    with pytest.raises(MigratorError, match="no intervals"):
        simulate(trace_of(), 100.0, stop_at=64, max_rounds=3)


def test_the_cli_prints_both_models(tmp_path):
    path = tmp_path / "hot.trace"
    write_trace(path, HOT)
    result = subprocess.run([sys.executable, "-m", "migrator", "predict", str(path), "--bandwidth", str(100 * PAGE),
                             "--downtime-ms", "1", "--max-rounds", "5"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    trace_row = next(line for line in lines if line.startswith("trace"))
    classic_row = next(line for line in lines if line.startswith("classic"))
    assert trace_row.split()[1] == "5" and trace_row.endswith("needed") and "not" not in trace_row
    assert classic_row.split()[1] == "5"


def test_with_the_engines_policy_its_rules_end_the_rounds():
    from migrator.source.policy import PolicySettings

    forced = PolicySettings(downtime_ms=1.0, force_switchover=True)
    # the hot set: 300 pages a round and flat; the engine's no-progress rule (less than 10 %
    # smaller over 3 rounds, checked from round 4 on) forces the switch-over after 5 rounds
    hot = simulate(HOT, 100.0, stop_at=0, max_rounds=30, policy=forced)
    assert hot.pages == pytest.approx((1000, 300, 300, 300, 300)) and not hot.converged
    # disjoint halves: 1000, 500, 250, 125, 62.5; the round of 62 pages is at most min-pages
    # (64), so the engine switches over with what that round's 0.3125 s wrote: 31.25 pages
    halves = simulate(DISJOINT, 200.0, stop_at=0, max_rounds=30, policy=forced)
    assert halves.pages == pytest.approx((1000, 500, 250, 125, 62.5))
    assert halves.final_pages == pytest.approx(31.25) and halves.converged
    # a downtime the pages left after round 1 fit (250 pages at 200 pages/s + 10 ms = 1260 ms):
    # without settling (--switch-asap) the engine switches there
    roomy = simulate(DISJOINT, 200.0, stop_at=0, max_rounds=30, fixed_ms=10.0,
                     policy=PolicySettings(downtime_ms=1500.0, force_switchover=True, settle=False))
    assert roomy.pages == pytest.approx((1000, 500)) and roomy.final_pages == pytest.approx(250)
    # settling, it goes on while the pages left halve, until they are at most min-pages
    settled = simulate(DISJOINT, 200.0, stop_at=0, max_rounds=30, fixed_ms=10.0,
                       policy=PolicySettings(downtime_ms=1500.0, force_switchover=True))
    assert settled.pages == pytest.approx((1000, 500, 250, 125)) and settled.final_pages == pytest.approx(62.5)
    # without force_switchover the engine would throttle: the prediction ends unconverged there
    throttled = simulate(HOT, 100.0, stop_at=0, max_rounds=30, policy=PolicySettings(downtime_ms=1.0))
    assert throttled.pages == pytest.approx((1000, 300, 300, 300, 300)) and not throttled.converged


def test_a_measured_round_zero_replaces_its_pages_over_the_bandwidth():
    # round 0 took 2 s (not 1000 / 1000 = 1 s): intervals 0 and 1 = 200 pages; 200 in 0.2 s -> 20
    slow = simulate(DISJOINT, 1000.0, stop_at=64, max_rounds=30, first_round_s=2.0)
    assert slow.pages == pytest.approx((1000, 200)) and slow.final_pages == pytest.approx(20)
