"""The convergence policy over recorded round histories, written as literal tables."""

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from migrator.core.errors import MigratorError
from migrator.source.report import RoundStats
from migrator.source.policy import (
    THROTTLE_MAX_ROUNDS,
    Action,
    PolicySettings,
    Rule,
    decide,
    outpaced_in_round_zero,
)

C, S, T, P = Action.CONTINUE, Action.SWITCHOVER, Action.THROTTLE, Action.POSTCOPY


def rounds(rows, dirty_rate: float = 20000.0):
    """(dirty_pages, expected_downtime_ms, throttle) rows -> RoundStats history; every round
    moves 1e9 bytes/s (244,140 pages/s)."""
    return [
        RoundStats(
            round=i, dirty_pages=dirty, zero_pages=0, bytes_raw=dirty * 4096, bytes_wire=dirty * 4096,
            scan_s=0.001, read_s=0.01, compress_s=0.0, send_s=0.02, duration_s=0.05,
            dirty_rate=dirty_rate, bandwidth=1e9, expected_downtime_ms=expected, throttle=throttle,
        )
        for i, (dirty, expected, throttle) in enumerate(rows)
    ]


START = [(262144, 900.0, 0.0), (40000, 160.0, 0.0), (20000, 70.0, 0.0)]

# name, settings, history rows, (action, rule, throttle)
CASES = [
    ("no round yet", {}, [], (C, Rule.FIRST_ROUND, 0.0)),
    # round 0 (50 ms here) settles as any round does, against a stop-and-copy's cost: round 0 itself
    ("round 0 within target, halving it: settles", {}, [(65536, 12.0, 0.0)], (C, Rule.SETTLING, 0.0)),
    ("round 0 within target, less than halving it", {}, [(65536, 30.0, 0.0)], (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("round 0 within target, --switch-asap", {"settle": False}, [(65536, 12.0, 0.0)], (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("within the headroom exactly", {}, START + [(14000, 45.0, 0.0)], (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("headroom just missed, shrinking", {}, START + [(14000, 45.1, 0.0)], (C, Rule.CONVERGING, 0.0)),
    ("under the target is not enough", {}, START + [(14000, 49.0, 0.0)], (C, Rule.CONVERGING, 0.0)),
    ("no headroom: target met exactly", {"headroom": 1.0}, START + [(14000, 50.0, 0.0)],
     (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("custom target", {"downtime_ms": 10.0}, START + [(5000, 12.0, 0.0)], (C, Rule.CONVERGING, 0.0)),
    ("few pages left although target missed", {"downtime_ms": 0.5}, START + [(64, 1.2, 0.0)],
     (S, Rule.MIN_PAGES, 0.0)),
    ("65 pages are not few", {"downtime_ms": 0.5}, START + [(65, 1.2, 0.0)], (C, Rule.CONVERGING, 0.0)),
    ("10 % growth is still progress", {}, START + [(22000, 75.0, 0.0)], (C, Rule.CONVERGING, 0.0)),
    ("growth over 10 % starts auto-converge", {}, START + [(22001, 75.0, 0.0)], (T, Rule.NO_PROGRESS, 0.20)),
    ("custom growth limit", {"max_growth": 0.5}, START + [(29000, 99.0, 0.0)], (C, Rule.CONVERGING, 0.0)),
    ("growth with force-switchover", {"force_switchover": True}, START + [(22001, 75.0, 0.0)],
     (S, Rule.NO_PROGRESS, 0.0)),
    ("a flat dirty set for three rounds starts auto-converge", {},
     START + [(19500, 68.0, 0.0), (19000, 66.0, 0.0), (18500, 64.0, 0.0)], (T, Rule.NO_PROGRESS, 0.20)),
    ("10 % smaller over three rounds is progress", {},
     START + [(19500, 68.0, 0.0), (19000, 66.0, 0.0), (18000, 63.0, 0.0)], (C, Rule.CONVERGING, 0.0)),
    ("two flat rounds are not yet a stall", {},
     START + [(19500, 68.0, 0.0), (19000, 66.0, 0.0)], (C, Rule.CONVERGING, 0.0)),
    ("custom flat window", {"flat_rounds": 1, "min_shrink": 0.05},
     START + [(19500, 68.0, 0.0)], (T, Rule.NO_PROGRESS, 0.20)),
    ("flat with force-switchover", {"force_switchover": True},
     START + [(19500, 68.0, 0.0), (19000, 66.0, 0.0), (18500, 64.0, 0.0)], (S, Rule.NO_PROGRESS, 0.0)),
    ("round limit starts auto-converge", {"max_rounds": 3}, START, (T, Rule.MAX_ROUNDS, 0.20)),
    ("round limit with force-switchover", {"max_rounds": 3, "force_switchover": True}, START,
     (S, Rule.MAX_ROUNDS, 0.0)),
    ("custom throttle start", {"throttle_initial": 0.5}, START + [(30000, 99.0, 0.0)],
     (T, Rule.NO_PROGRESS, 0.5)),
    ("first throttled round counts pages of an unthrottled one", {},
     START + [(30000, 99.0, 0.0), (33000, 110.0, 0.2)], (C, Rule.THROTTLE_PENDING, 0.2)),
    ("throttle works: keep it", {},
     START + [(30000, 99.0, 0.0), (33000, 110.0, 0.2), (25000, 80.0, 0.2)], (C, Rule.CONVERGING, 0.2)),
    ("throttle not enough: +10 %", {},
     START + [(30000, 99.0, 0.0), (33000, 110.0, 0.2), (33000, 110.0, 0.2)], (T, Rule.NO_PROGRESS, 0.3)),
    ("throttled guest reaches target", {},
     START + [(30000, 99.0, 0.0), (33000, 110.0, 0.2), (9000, 31.0, 0.2)], (S, Rule.DOWNTIME_TARGET, 0.2)),
    ("last step is capped at the maximum", {},
     [(262144, 900.0, 0.0), (40000, 160.0, 0.9), (40000, 160.0, 0.9)], (T, Rule.NO_PROGRESS, 0.99)),
    ("custom increment and maximum", {"throttle_increment": 0.25, "throttle_max": 0.6},
     [(262144, 900.0, 0.0), (40000, 160.0, 0.5), (40000, 160.0, 0.5)], (T, Rule.NO_PROGRESS, 0.6)),
    ("maximum just reached", {},
     [(262144, 900.0, 0.0), (40000, 160.0, 0.9), (41000, 160.0, 0.99)], (C, Rule.THROTTLE_PENDING, 0.99)),
    ("at the maximum for 2 rounds: hold", {},
     [(262144, 900.0, 0.0), (40000, 160.0, 0.9), (41000, 160.0, 0.99), (41000, 160.0, 0.99)],
     (T, Rule.NO_PROGRESS, 0.99)),
    ("at the maximum for 3 rounds: switch over anyway", {},
     [(262144, 900.0, 0.0), (40000, 160.0, 0.99), (41000, 160.0, 0.99), (41000, 160.0, 0.99)],
     (S, Rule.THROTTLE_MAX, 0.99)),
    ("at the maximum but shrinking: continue", {},
     [(262144, 900.0, 0.0), (40000, 160.0, 0.99), (41000, 160.0, 0.99), (39000, 150.0, 0.99)],
     (C, Rule.CONVERGING, 0.99)),
    # post-copy: a converging pre-copy still ends in a stop-and-copy; a stall switches to
    # post-copy instead of throttling (auto), or N rounds do (postcopy_after)
    ("postcopy-after: N rounds run", {"postcopy_after": 3}, START, (P, Rule.POSTCOPY_AFTER, 0.0)),
    ("postcopy-after: fewer rounds run", {"postcopy_after": 4}, START, (C, Rule.CONVERGING, 0.0)),
    ("postcopy-after: converged first", {"postcopy_after": 1}, [(65536, 12.0, 0.0)],
     (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("auto: growth switches to post-copy", {"postcopy_auto": True}, START + [(22001, 75.0, 0.0)],
     (P, Rule.NO_PROGRESS, 0.0)),
    ("auto: a flat dirty set switches to post-copy", {"postcopy_auto": True},
     START + [(19500, 68.0, 0.0), (19000, 66.0, 0.0), (18500, 64.0, 0.0)], (P, Rule.NO_PROGRESS, 0.0)),
    ("auto: the round limit switches to post-copy", {"postcopy_auto": True, "max_rounds": 3}, START,
     (P, Rule.MAX_ROUNDS, 0.0)),
    ("auto: converging continues", {"postcopy_auto": True}, START, (C, Rule.CONVERGING, 0.0)),
    ("auto: the target still comes first", {"postcopy_auto": True}, START + [(14000, 45.0, 0.0)],
     (S, Rule.DOWNTIME_TARGET, 0.0)),
    # settling: the target is met, but the expected downtime halved since the last round
    ("target met, halved: one more round", {}, START + [(9000, 35.0, 0.0)], (C, Rule.SETTLING, 0.0)),
    ("target met, not halved: switch over", {}, START + [(9000, 35.1, 0.0)], (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("settling off (--switch-asap)", {"settle": False}, START + [(9000, 35.0, 0.0)],
     (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("no settling on the last round allowed", {"max_rounds": 4}, START + [(9000, 35.0, 0.0)],
     (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("no settling under throttle", {}, START + [(9000, 35.0, 0.2)], (S, Rule.DOWNTIME_TARGET, 0.2)),
    ("no settling with few pages left", {}, START + [(64, 2.0, 0.0)], (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("round 0 within target, few pages", {}, [(64, 1.0, 0.0)], (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("round 0 within target, --postcopy-after 1", {"postcopy_after": 1}, [(65536, 12.0, 0.0)],
     (S, Rule.DOWNTIME_TARGET, 0.0)),
    ("round 0 far over, round 1 within: settle", {}, [(262144, 900.0, 0.0), (3000, 20.0, 0.0)],
     (C, Rule.SETTLING, 0.0)),
]


def settling(left: int, sent: int = 2477, expected: float = 11.0, fixed: float = 7.0, before: float = 14.0,
             **settings):
    """The decision after a round that sent ``sent`` pages and left ``left``, its expected downtime
    (``expected``, ``fixed`` of it the fixed part) within a 50 ms target but not half the
    round's before."""
    history = rounds([(262144, 900.0, 0.0), (15861, before, 0.0), (sent, expected, 0.0)])
    history[-1] = replace(history[-1], pages_left=left, expected_fixed_ms=fixed)
    return decide(history, PolicySettings(downtime_ms=50.0, **settings))


def test_the_pages_left_halving_settle_where_the_fixed_part_hides_it_from_the_estimate():
    """A 4 GiB run's last rounds: 2477 pages sent, 716 left, the estimate 14 -> 11 ms, 7 of it fixed."""
    decision = settling(716)
    assert (decision.action, decision.rule) == (C, Rule.SETTLING)
    assert "716 pages are left of the 2477" in decision.reason
    assert settling(1239).rule is Rule.DOWNTIME_TARGET, "more than half left: switch over"
    assert settling(64).rule is Rule.DOWNTIME_TARGET, "at most min-pages left: not worth a round"
    assert settling(716, expected=8.7, fixed=7.0).rule is Rule.DOWNTIME_TARGET, \
        "a copy under a quarter of the fixed part is not worth a round"
    assert settling(716, expected=8.75, fixed=7.0).rule is Rule.SETTLING
    assert settling(-1, fixed=0.0).rule is Rule.DOWNTIME_TARGET, "not recorded (an old history): the estimate alone"
    assert settling(716, settle=False).rule is Rule.DOWNTIME_TARGET
    assert settling(716, max_rounds=3).rule is Rule.DOWNTIME_TARGET, "the last round allowed"



@pytest.mark.parametrize("name, overrides, rows, expected", CASES, ids=[c[0] for c in CASES])
def test_decision_table(name, overrides, rows, expected):
    d = decide(rounds(rows), PolicySettings(**overrides))
    assert (d.action, d.rule, d.throttle) == expected
    assert d.reason and "\n" not in d.reason


# A recorded run of a guest whose writes outrun the link (1 GiB, 200,000 pages/s, 10 ms target):
# (dirty_pages, expected_ms, throttle in force, then the decision taken after that round).
RUNAWAY = [
    (262144, 620.0, 0.0, C, Rule.CONVERGING, 0.0),
    (31000, 75.0, 0.0, C, Rule.CONVERGING, 0.0),
    (15500, 41.0, 0.0, C, Rule.CONVERGING, 0.0),
    (16800, 44.0, 0.0, C, Rule.CONVERGING, 0.0),        # +8 %: still within P.Haul's 10 %
    (19100, 50.0, 0.0, T, Rule.NO_PROGRESS, 0.2),       # +14 %
    (21000, 55.0, 0.2, C, Rule.THROTTLE_PENDING, 0.2),  # written before the throttle began
    (18000, 47.0, 0.2, C, Rule.CONVERGING, 0.2),
    (18500, 48.0, 0.2, T, Rule.NO_PROGRESS, 0.3),
    (17000, 44.0, 0.3, C, Rule.CONVERGING, 0.3),
    (11000, 29.0, 0.3, C, Rule.CONVERGING, 0.3),
    (6000, 16.0, 0.3, C, Rule.CONVERGING, 0.3),
    (3100, 8.9, 0.3, S, Rule.DOWNTIME_TARGET, 0.3),
]


def test_recorded_runaway_guest_is_throttled_until_it_converges():
    history = rounds([row[:3] for row in RUNAWAY])
    policy = PolicySettings(downtime_ms=10.0)
    for i, (*_, action, rule, throttle) in enumerate(RUNAWAY):
        d = decide(history[: i + 1], policy)
        assert (d.action, d.rule, d.throttle) == (action, rule, throttle), f"after round {i}"
        if i + 1 < len(RUNAWAY):
            assert RUNAWAY[i + 1][2] == d.throttle, "the next round runs with the decided duty"


@pytest.mark.parametrize("dirty_rate, auto, expected", [
    (230000.0, True, (P, Rule.OUTPACED)),     # 94 % of the 244k pages/s the round moved
    (219727.0, True, (P, Rule.OUTPACED)),     # 90 %: no 10 % shrink possible
    (219000.0, True, (C, Rule.CONVERGING)),   # just under: the next round may still shrink it
    (230000.0, False, (C, Rule.CONVERGING)),  # pre-copy alone does not judge the pace
])
def test_a_guest_outpacing_the_round_switches_to_postcopy_at_once(dirty_rate, auto, expected):
    """Right after round 0: a guest dirtying pages about as fast as they move would only have
    its region sent again; the hybrid switches without waiting for a stall over rounds."""
    d = decide(rounds([(262144, 900.0, 0.0)], dirty_rate=dirty_rate), PolicySettings(postcopy_auto=auto))
    assert (d.action, d.rule) == expected
    assert d.throttle == 0.0


@pytest.mark.parametrize("sent, written, seconds, auto, switches", [
    (32768, 150000, 0.11, True, True),     # measured: 1 GiB writing without limit, probed after 1/8
    (32768, 2200, 0.11, True, False),      # measured: 20k pages/s
    (32768, 29492, 0.1, True, True),       # 90 % of the pages/s moved: no 10 % shrink possible
    (32768, 29000, 0.1, True, False),      # just under
    (32768, 150000, 0.11, False, False),   # pre-copy alone does not probe
    (0, 150000, 0.11, True, False),        # nothing sent yet: no pace to judge
    (32768, 150000, 0.0, True, False),
])
def test_the_hybrid_probe_in_round_zero_switches_when_the_guest_outwrites_the_round(sent, written, seconds, auto,
                                                                                      switches):
    d = outpaced_in_round_zero(sent, written, seconds, PolicySettings(postcopy_auto=auto))
    if not switches:
        assert d is None
        return
    assert (d.action, d.rule, d.throttle) == (P, Rule.OUTPACED, 0.0)
    assert f"after {sent} of its pages" in d.reason and "in round 0" in d.reason


def test_the_recorded_runaway_guest_switches_to_postcopy_where_it_would_be_throttled():
    """The hybrid on the same history: identical decisions up to the first stall, which switches
    to post-copy instead of starting auto-converge, so the guest is never slowed."""
    history = rounds([row[:3] for row in RUNAWAY])
    policy = PolicySettings(downtime_ms=10.0, postcopy_auto=True)
    first_stall = next(i for i, row in enumerate(RUNAWAY) if row[3] is T)
    for i in range(first_stall):
        assert decide(history[: i + 1], policy).action is RUNAWAY[i][3]
    d = decide(history[: first_stall + 1], policy)
    assert (d.action, d.rule, d.throttle) == (P, Rule.NO_PROGRESS, 0.0)
    assert "post-copy" in d.reason


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"downtime_ms": 0}, "downtime_ms must be > 0"),
        ({"max_rounds": 0}, "max_rounds must be >= 1"),
        ({"headroom": 0}, "headroom must be in"),
        ({"headroom": 1.5}, "headroom must be in"),
        ({"max_growth": -0.1}, "max_growth must be >= 0"),
        ({"min_pages": -1}, "min_pages must be >= 0"),
        ({"postcopy_after": -1}, "postcopy_after must be >= 0"),
        ({"throttle_increment": 0}, "throttle_increment must be > 0"),
        ({"throttle_max": 1.0}, "0 < initial <= max < 1"),
        ({"throttle_initial": 0.5, "throttle_max": 0.4}, "0 < initial <= max < 1"),
    ],
)
def test_bad_settings_are_rejected_with_one_line(overrides, message):
    with pytest.raises(MigratorError, match=message):
        PolicySettings(**overrides)


@hsettings(max_examples=200, deadline=None)
@given(
    dirty=st.lists(st.integers(min_value=65, max_value=10**6), min_size=1, max_size=200),
    max_rounds=st.integers(min_value=1, max_value=30),
    increment=st.sampled_from([0.05, 0.1, 0.3]),
)
def test_pre_copy_always_ends(dirty, max_rounds, increment):
    """Whatever the guest writes, feeding each decision's duty back ends in a bounded number of rounds."""
    policy = PolicySettings(downtime_ms=1.0, max_rounds=max_rounds, throttle_increment=increment)
    steps = math.ceil((policy.throttle_max - policy.throttle_initial) / increment) + 1
    bound = max_rounds + 2 * steps + THROTTLE_MAX_ROUNDS
    rows, duty = [], 0.0
    for i in range(bound + 1):
        rows.append((dirty[i % len(dirty)], 1e6, duty))
        d = decide(rounds(rows), policy)
        assert 0 <= d.throttle <= policy.throttle_max
        if d.action is Action.SWITCHOVER:
            assert d.rule in (Rule.THROTTLE_MAX,), d
            return
        duty = d.throttle
    pytest.fail(f"no switch-over after {bound + 1} rounds")
