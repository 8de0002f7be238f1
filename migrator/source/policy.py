"""When to stop pre-copying: a pure function of the round history (no I/O, no clock).

The rules, checked in this order after every round (the report records the rule's name):

=================  ===========  ================================================================
rule               action       when
=================  ===========  ================================================================
settling           CONTINUE     (``settle``) the target is met, but the expected downtime is at most
                                ``SETTLE_GAIN`` times the previous round's (after round 0: times a
                                stop-and-copy's, round 0's own length), or the pages left are at
                                most ``SETTLE_GAIN`` times those the round sent and their copy is
                                at least ``SETTLE_COPY_SHARE`` of the fixed part: another round is
                                short and cuts the final copy about as much again
downtime-target    SWITCHOVER   the last round's expected downtime is within ``headroom`` times the
                                target (QEMU's rule, aimed a little under the target)
min-pages          SWITCHOVER   the last round moved at most ``min_pages`` pages (P.Haul)
converging         CONTINUE     the dirty set is not growing and rounds are left
no-progress        THROTTLE     the dirty set grew by more than ``max_growth`` (P.Haul), or it
                                shrank by less than ``min_shrink`` over the last ``flat_rounds``
                                rounds; while throttled, it did not shrink at all
max-rounds         THROTTLE     ``max_rounds`` rounds have run and the target is still missed
throttle-pending   CONTINUE     stalled, but the last throttle change has not shown in the dirty
                                set yet (see below)
throttle-max       SWITCHOVER   ``THROTTLE_MAX_ROUNDS`` rounds at ``throttle_max`` and still stalled
postcopy-after     POSTCOPY     ``postcopy_after`` rounds have run and the target is still missed
outpaced           POSTCOPY     (``postcopy_auto``) the guest wrote pages at least ``1 - min_shrink``
                                times as fast as the round moved them: the next round cannot
                                shrink the dirty set by ``min_shrink``
=================  ===========  ================================================================

``outpaced`` is also asked part-way through round 0 (``outpaced_in_round_zero``): the hybrid sends
round 0's pages for ``PROBE_S``, scans, and switches to post-copy there when the guest already
writes faster than the round moves pages, instead of sending the rest of a region the guest
rewrites as it goes (its writes dirtied nearly every page by the end of round 0, and post-copy
then sent the whole region a second time).

Post-copy (``postcopy_after``, ``postcopy_auto``): the target and min-pages rules still come
first, so a pre-copy that converges ends in a plain stop-and-copy. With ``postcopy_auto`` a stall
(no-progress or max-rounds) switches to post-copy under the stall's rule name instead of
throttling the guest: the hybrid, pre-copy while it makes progress and post-copy once it stops.
It does not wait for the stall to show over ``flat_rounds`` rounds when one round already says
it: a guest that dirtied pages as fast as the round sent them (``outpaced``, often right after
round 0 for a guest writing without limit) would only have the whole region sent again.

Why ``headroom``: the expected downtime is an estimate, and on the 2-vCPU test machine the
measured downtime of a 1 GiB guest came out 0-10 % above it (timing noise of the rounds it is
learned from). Switching over only once the estimate is within 90 % of the target costs at most
one more short round and keeps the measured downtime within the target.

Why "settling": the target is a limit, not an aim. Right after round 0 the expected downtime
often falls from far above the target to just under it (a 4 GiB guest's round 1 is still long
enough to leave thousands of pages dirty), and switching there spends most of the target when one
more round, a fraction of round 0's length, would bring the downtime near its fixed part. Once
the fixed part dominates the estimate it stops halving. The pages left keep halving a little
longer: a large guest's last rounds are longer, so with the estimate's test alone it stopped
with more pages to copy than a small guest did. Settling on either brings every size to the
pages a short round leaves, where the dirty set stops halving, and the downtime no longer grows
with the region; each extra round is a few milliseconds of pre-copy, not of downtime. A final
copy that is already small beside the fixed part (under ``SETTLE_COPY_SHARE`` of it) is not
worth a round. The switch-over follows once neither test passes; under auto-converge, on the last round allowed (``max_rounds``, ``postcopy_after``) or with at most
``min_pages`` pages left there is no settling.
Round 0 settles too: with a fast round 0 a small guest meets the target right after it, with the
pages written during the whole of round 0 still to copy inside the downtime; what the switch
would have cost before round 0 is round 0 itself (it sent every page), so the same test applies.
``settle=False`` (``migrate --switch-asap``) switches as soon as the target is met, as QEMU does.

Why a flat dirty set is no progress: a guest that writes about as fast as the link moves pages
leaves a dirty set that neither grows past ``max_growth`` nor shrinks; without this rule it
counted as converging until ``max_rounds``, dozens of rounds before auto-converge started.

With ``force_switchover`` a stall (no-progress or max-rounds) switches over at once under its own
rule name instead of throttling, so a final rule of "no-progress" or "max-rounds" means a forced
switch-over. Auto-converge follows QEMU's cpu-throttle: start at ``throttle_initial`` and add
``throttle_increment`` per stalled round up to ``throttle_max``.

Why "throttle-pending": ``RoundStats.dirty_pages`` of round k counts pages written during round
k-1, so a duty set after round k first shows in round k+2's dirty set. Raising the duty again on
round k+1's stale count would overshoot; QEMU likewise raises its throttle at most every second
bitmap sync. Every path ends: after ``max_rounds`` every round is stalled, the duty reaches its
maximum within about twice ``(throttle_max - throttle_initial) / throttle_increment`` rounds, and
``THROTTLE_MAX_ROUNDS`` rounds later the policy switches over.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.errors import MigratorError
from .report import RoundStats

# P.Haul's iteration limits (phaul/iters.py).
MIN_ITER_PAGES_COUNT = 64       # a round this small is not worth another one
MAX_ITER_GROW_RATE = 0.10       # growth round over round that means "not converging"
# QEMU's defaults (--downtime-limit 300 ms there; ours is tighter) and cpu-throttle parameters.
DOWNTIME_MS = 50.0
DOWNTIME_HEADROOM = 0.9         # switch over when the estimate is within this share of the target
MAX_ROUNDS = 30
CPU_THROTTLE_INITIAL = 0.20
CPU_THROTTLE_INCREMENT = 0.10
CPU_THROTTLE_MAX = 0.99
# Rounds at the maximum duty that still stall before giving up and switching over anyway.
THROTTLE_MAX_ROUNDS = 3
# Settling: once the target is met, another round while the expected downtime is at most this
# share of the previous round's.
SETTLE_GAIN = 0.5
SETTLE_COPY_SHARE = 0.25   # pages left worth a settling round: their copy against the fixed part
# A dirty set that shrank by less than this share over that many rounds is not converging.
MIN_SHRINK = 0.10
FLAT_ROUNDS = 3


class Action(enum.Enum):
    CONTINUE = "continue"       # run another round with ``Decision.throttle`` in force
    SWITCHOVER = "switchover"   # freeze the guest and stop-and-copy
    THROTTLE = "throttle"       # run another round, auto-converge duty changed or held at max
    POSTCOPY = "postcopy"       # freeze the guest, resume it at the destination, pages follow


class Rule(enum.StrEnum):
    FIRST_ROUND = "first-round"
    SETTLING = "settling"
    DOWNTIME_TARGET = "downtime-target"
    MIN_PAGES = "min-pages"
    CONVERGING = "converging"
    NO_PROGRESS = "no-progress"
    MAX_ROUNDS = "max-rounds"
    THROTTLE_PENDING = "throttle-pending"
    THROTTLE_MAX = "throttle-max"
    POSTCOPY_AFTER = "postcopy-after"
    OUTPACED = "outpaced"


@dataclass(frozen=True)
class PolicySettings:
    downtime_ms: float = DOWNTIME_MS
    headroom: float = DOWNTIME_HEADROOM
    max_rounds: int = MAX_ROUNDS
    max_growth: float = MAX_ITER_GROW_RATE
    min_shrink: float = MIN_SHRINK
    flat_rounds: int = FLAT_ROUNDS
    force_switchover: bool = False
    throttle_initial: float = CPU_THROTTLE_INITIAL
    throttle_increment: float = CPU_THROTTLE_INCREMENT
    throttle_max: float = CPU_THROTTLE_MAX
    min_pages: int = MIN_ITER_PAGES_COUNT
    postcopy_after: int | None = None   # rounds of pre-copy before post-copy (0: right after round 0's scan)
    postcopy_auto: bool = False         # post-copy instead of throttling, once pre-copy stalls
    settle: bool = True                 # rounds past the target while they halve the expected downtime

    def __post_init__(self) -> None:
        problems = [
            (self.downtime_ms > 0, f"downtime_ms must be > 0, got {self.downtime_ms}"),
            (0 < self.headroom <= 1, f"headroom must be in (0, 1], got {self.headroom}"),
            (self.max_rounds >= 1, f"max_rounds must be >= 1, got {self.max_rounds}"),
            (self.max_growth >= 0, f"max_growth must be >= 0, got {self.max_growth}"),
            (0 <= self.min_shrink < 1, f"min_shrink must be in [0, 1), got {self.min_shrink}"),
            (self.flat_rounds >= 1, f"flat_rounds must be >= 1, got {self.flat_rounds}"),
            (self.min_pages >= 0, f"min_pages must be >= 0, got {self.min_pages}"),
            (self.postcopy_after is None or self.postcopy_after >= 0,
             f"postcopy_after must be >= 0, got {self.postcopy_after}"),
            (self.throttle_increment > 0, f"throttle_increment must be > 0, got {self.throttle_increment}"),
            (
                0 < self.throttle_initial <= self.throttle_max < 1,
                f"throttle duties need 0 < initial <= max < 1, got {self.throttle_initial} and {self.throttle_max}",
            ),
        ]
        for ok, message in problems:
            if not ok:
                raise MigratorError(message)


PROBE_S = 0.05               # of round 0 sent before the hybrid's probe scan (a shorter round 0 has none)


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: Rule
    throttle: float   # duty fraction to apply from now on (0 = none)
    reason: str       # one human line


def decide(history: Sequence[RoundStats], settings: PolicySettings = PolicySettings()) -> Decision:
    """What to do after the last round of ``history`` (rounds in order, round 0 first)."""
    if not history:
        return Decision(Action.CONTINUE, Rule.FIRST_ROUND, 0.0, "no round has run yet")
    last, s = history[-1], settings
    duty = last.throttle
    if last.expected_downtime_ms <= s.headroom * s.downtime_ms:
        if (settling := _settling(history, s)) is not None:
            return Decision(Action.CONTINUE, Rule.SETTLING, duty, settling)
        aim = "" if s.headroom == 1 else f"{s.headroom:.0%} of "
        return Decision(
            Action.SWITCHOVER, Rule.DOWNTIME_TARGET, duty,
            f"expected downtime {last.expected_downtime_ms:.1f} ms is within {aim}the {s.downtime_ms:g} ms target",
        )
    if last.dirty_pages <= s.min_pages:
        return Decision(
            Action.SWITCHOVER, Rule.MIN_PAGES, duty,
            f"round {last.round} moved {last.dirty_pages} pages (at most {s.min_pages})",
        )
    if s.postcopy_auto and (pace := _outpaced(last, s)) is not None:
        return Decision(Action.POSTCOPY, Rule.OUTPACED, duty, f"{pace}; switching to post-copy (--postcopy-after auto)")
    if s.postcopy_after is not None and len(history) >= s.postcopy_after:
        return Decision(
            Action.POSTCOPY, Rule.POSTCOPY_AFTER, duty,
            f"{len(history)} rounds of pre-copy run (--postcopy-after {s.postcopy_after}); switching to post-copy",
        )
    stall = _stall(history, s)
    if stall is not None and s.postcopy_auto:
        rule, why = stall
        return Decision(Action.POSTCOPY, rule, duty, f"{why}; switching to post-copy (--postcopy-after auto)")
    if stall is None:
        return Decision(
            Action.CONTINUE, Rule.CONVERGING, duty,
            f"{last.dirty_pages} dirty pages, expected downtime {last.expected_downtime_ms:.1f} ms",
        )
    rule, why = stall
    if s.force_switchover:
        return Decision(Action.SWITCHOVER, rule, duty, f"{why}; switching over (force-switchover)")
    if duty > 0 and len(history) >= 2 and history[-2].throttle != duty:
        return Decision(
            Action.CONTINUE, Rule.THROTTLE_PENDING, duty,
            f"{why}; the {duty:.0%} throttle has not shown in the dirty set yet",
        )
    if duty >= s.throttle_max:
        at_max = _trailing(history, lambda r: r.throttle >= s.throttle_max)
        if at_max >= THROTTLE_MAX_ROUNDS:
            return Decision(
                Action.SWITCHOVER, Rule.THROTTLE_MAX, duty,
                f"{why} after {at_max} rounds at the maximum {duty:.0%} throttle; switching over anyway",
            )
        return Decision(Action.THROTTLE, rule, duty, f"{why}; throttle held at its maximum {duty:.0%}")
    new = s.throttle_initial if duty == 0 else min(s.throttle_max, round(duty + s.throttle_increment, 6))
    return Decision(Action.THROTTLE, rule, new, f"{why}; throttle {duty:.0%} -> {new:.0%}")


def _settling(history: Sequence[RoundStats], s: PolicySettings) -> str | None:
    """Why one more round pays although the target is met (see "settling"), if it does."""
    last = history[-1]
    last_allowed = s.max_rounds if s.postcopy_after is None else min(s.max_rounds, s.postcopy_after)
    if not s.settle or len(history) >= last_allowed or last.throttle > 0:
        return None
    before = history[-2].expected_downtime_ms if len(history) >= 2 else last.duration_s * 1000
    if last.dirty_pages <= s.min_pages:
        return None
    met = f"expected downtime {last.expected_downtime_ms:.1f} ms is within the {s.downtime_ms:g} ms target"
    if last.expected_downtime_ms <= SETTLE_GAIN * before:
        return f"{met}, down from {before:.1f} ms: one more round"
    copy_ms = last.expected_downtime_ms - last.expected_fixed_ms
    if s.min_pages < last.pages_left <= SETTLE_GAIN * last.dirty_pages and copy_ms >= SETTLE_COPY_SHARE * last.expected_fixed_ms:
        return f"{met}, and {last.pages_left} pages are left of the {last.dirty_pages} the round sent: one more round"
    return None


def _stall(history: Sequence[RoundStats], s: PolicySettings) -> tuple[Rule, str] | None:
    """(rule, reason) when the last round shows pre-copy is not converging by itself."""
    last = history[-1]
    if len(history) >= s.max_rounds:
        return Rule.MAX_ROUNDS, f"{len(history)} rounds run (max {s.max_rounds})"
    if len(history) < 2:
        return None
    prev = history[-2].dirty_pages
    if last.throttle > 0:   # auto-converge on: anything short of shrinking is a stall
        if last.dirty_pages >= prev:
            return Rule.NO_PROGRESS, f"dirty set did not shrink under throttle ({prev} -> {last.dirty_pages} pages)"
    elif last.dirty_pages > prev * (1 + s.max_growth):
        return Rule.NO_PROGRESS, (
            f"dirty set grew {prev} -> {last.dirty_pages} pages (more than {s.max_growth:.0%})"
        )
    elif len(history) >= s.flat_rounds + 2:   # round 0 covers every page: compare later rounds only
        before = history[-1 - s.flat_rounds].dirty_pages
        if last.dirty_pages > before * (1 - s.min_shrink):
            return Rule.NO_PROGRESS, (
                f"dirty set flat: {before} -> {last.dirty_pages} pages over {s.flat_rounds} rounds "
                f"(less than {s.min_shrink:.0%} smaller)"
            )
    return None


def outpaced_in_round_zero(sent_pages: int, written_pages: int, seconds: float,
                           settings: PolicySettings) -> Decision | None:
    """The hybrid's probe part-way through round 0: ``sent_pages`` went in ``seconds`` since the
    tracker was armed, while the guest wrote ``written_pages`` distinct pages. POSTCOPY (rule
    ``outpaced``) when it writes at least ``1 - min_shrink`` times as fast as the round moves
    pages; None (go on with round 0) otherwise, and always without ``postcopy_auto``."""
    s = settings
    if not s.postcopy_auto or sent_pages <= 0 or seconds <= 0:
        return None
    moved, rate = sent_pages / seconds, written_pages / seconds
    if rate < (1 - s.min_shrink) * moved:
        return None
    return Decision(
        Action.POSTCOPY, Rule.OUTPACED, 0.0,
        f"the guest wrote {rate:.0f} pages/s while round 0 moved {moved:.0f} pages/s (after {sent_pages} of its "
        f"pages): no round would shrink the dirty set by {s.min_shrink:.0%}; switching to post-copy in round 0 "
        "(--postcopy-after auto)",
    )


def _outpaced(last: RoundStats, s: PolicySettings) -> str | None:
    """Why the next round cannot shrink the dirty set by ``min_shrink``, if it cannot: the guest
    writes pages at least ``1 - min_shrink`` times as fast as the last round moved them."""
    sent = last.dirty_pages - last.zero_pages
    if sent <= 0 or last.bytes_raw <= 0 or last.bandwidth <= 0:
        return None
    moved = sent * last.bandwidth / last.bytes_raw        # pages/s the round moved
    if last.dirty_rate < (1 - s.min_shrink) * moved:
        return None
    return (f"the guest wrote {last.dirty_rate:.0f} pages/s while round {last.round} moved {moved:.0f} pages/s: "
            f"the next round would not shrink the dirty set by {s.min_shrink:.0%}")


def _trailing(history: Sequence[RoundStats], predicate) -> int:
    """How many rounds at the end of ``history`` satisfy ``predicate``."""
    count = 0
    for r in reversed(history):
        if not predicate(r):
            break
        count += 1
    return count
