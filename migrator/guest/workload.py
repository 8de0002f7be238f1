"""The guest's workload over its region: format, run steps, self-check, tag. Not thread-aware.

All state lives in the region (control block, version table, page headers), so a region copied
into another process continues exactly where it stopped; see ``migrator/native/workload.h`` for
the layout and ``workload.c`` for the step protocol. The compiled calls release the GIL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.errors import GuestError
from ..native.workload import ffi, lib
from .layout import Geometry, Settings, region_digest
from .mapping import RegionMapping
from .pacing import Steady
from .replay import NAME_MAX, ReplayTimeline

_PATTERN_CODES = {"uniform": lib.PATTERN_UNIFORM, "hot": lib.PATTERN_HOT, "sequential": lib.PATTERN_SEQUENTIAL,
                  "replay": lib.PATTERN_REPLAY}
_FILL_CODES = {"random": lib.FILL_RANDOM, "text": lib.FILL_TEXT, "sparse": lib.FILL_SPARSE}
_PATTERN_NAMES = {code: name for name, code in _PATTERN_CODES.items()}
_FILL_NAMES = {code: name for name, code in _FILL_CODES.items()}

# How check() words a problem code; {0} and {1} are the two detail numbers the C check returns.
PROBLEMS = {
    lib.PROBLEM_CTL_MAGIC: "control block: bad magic (not a guest region, or not restored yet)",
    lib.PROBLEM_CTL_VERSION: "control block: layout version {0}, this guest reads version {1}",
    lib.PROBLEM_CTL_GEOMETRY: "control block: describes {0} pages, but the region has {1}",
    lib.PROBLEM_CTL_SETTINGS: "control block: invalid settings (pattern, fill, rate or hot set)",
    lib.PROBLEM_CTL_CHECKSUM: "control block: settings checksum mismatch",
    lib.PROBLEM_CTL_STEPS: "control block: in-flight marker {0} does not fit step counter {1}",
    lib.PROBLEM_CTL_TAG: "control block: tag length {0} exceeds the maximum",
    lib.PROBLEM_CTL_SCHEDULE: "control block: the replay schedule is damaged or inconsistent",
    lib.PROBLEM_TABLE_AHEAD: "version table says step {0}, but only {1} steps are done",
    lib.PROBLEM_TABLE_WRONG_STEP: "version table says step {0}, which wrote another page",
    lib.PROBLEM_HEADER_MISSING: "page header missing (a zero page: never written or not transferred)",
    lib.PROBLEM_HEADER_CORRUPT: "page header corrupted (bad magic or checksum)",
    lib.PROBLEM_HEADER_INDEX: "page header names page {0} (misplaced page)",
    lib.PROBLEM_STALE: "stale page: header says step {0}, version table says step {1}",
    lib.PROBLEM_BODY: "page body differs from version {0} of the page (0 = initial fill)",
    lib.PROBLEM_OUTSIDE: "pages to check start at page {0}, outside the region's {1} pages",
}


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Outcome of the self-check; ``first_bad_page`` counts pages from the region's start."""

    clean: bool
    first_bad_page: int | None = None
    problem: str | None = None


class Workload:
    """Steps of the deterministic writer over ``mapping``, whose page 0 is the control block."""

    def __init__(self, mapping: RegionMapping) -> None:
        self.mapping = mapping
        self._base = mapping.pointer
        self._ctl = ffi.cast("struct guest_control *", self._base)
        self._timeline: ReplayTimeline | None = None

    @classmethod
    def create(cls, mapping: RegionMapping, settings: Settings) -> Workload:
        """Write the control block for ``settings`` (and a replay's schedule) and the initial
        fill of every data page."""
        workload = cls(mapping)
        plan = settings.replay
        geometry = Geometry.for_size(mapping.size, plan.schedule_pages if plan else 0)
        if plan is not None and plan.data_pages > geometry.data_pages:
            raise GuestError(f"a region of {mapping.size} bytes cannot replay {plan.name}")
        hot, threshold, stride = settings.pattern.hot_parameters(geometry.data_pages)
        ctl = workload._ctl
        ctl.magic = lib.GUEST_MAGIC
        ctl.layout_version = lib.GUEST_LAYOUT_VERSION
        ctl.page_size = lib.GUEST_PAGE_SIZE
        ctl.region_pages = geometry.region_pages
        ctl.table_pages = geometry.table_pages
        ctl.data_pages = geometry.data_pages
        ctl.seed = settings.seed
        ctl.pattern = _PATTERN_CODES["replay" if plan else settings.pattern.kind]
        ctl.fill = _FILL_CODES[settings.fill]
        ctl.hot_pages, ctl.hot_threshold, ctl.hot_stride = hot, threshold, stride
        ctl.dirty_rate = 0.0 if plan else settings.dirty_rate or 0.0
        if plan is not None:
            workload._write_schedule(geometry, plan)
        lib.guest_format(workload._base)
        return workload

    def _write_schedule(self, geometry: Geometry, plan) -> None:
        """The plan's name, intervals and runs at page 1 + table_pages (workload.h)."""
        ctl = self._ctl
        ctl.schedule_pages = geometry.schedule_pages
        ctl.replay_steps = plan.steps
        ctl.replay_runs = len(plan.runs)
        ctl.replay_intervals = len(plan.intervals)
        name = plan.name_bytes
        ctl.replay_name_len = len(name)
        ctl.replay_seconds = plan.seconds
        at = self._base + (1 + geometry.table_pages) * lib.GUEST_PAGE_SIZE
        ffi.memmove(at, name.ljust(NAME_MAX, b"\0"), NAME_MAX)
        intervals = ffi.new("struct replay_interval[]", list(plan.intervals))
        ffi.memmove(at + NAME_MAX, intervals, ffi.sizeof(intervals))
        steps, runs = 0, []
        for page, pages in plan.runs:
            runs.append((steps, page, pages))
            steps += pages
        runs = ffi.new("struct replay_run[]", runs)
        ffi.memmove(at + NAME_MAX + ffi.sizeof(intervals), runs, ffi.sizeof(runs))
    # --- reading the control block ------------------------------------------------------------

    def control_problem(self) -> str | None:
        """Why the control block cannot be continued from (magic, layout, size, settings), or None."""
        detail = ffi.new("uint64_t[2]")
        code = lib.guest_check_control(self._base, self.mapping.size, detail)
        return PROBLEMS[code].format(detail[0], detail[1]) if code else None

    def validate(self) -> None:
        """Raise GuestError unless the region holds a control block this guest can continue."""
        problem = self.control_problem()
        if problem:
            raise GuestError(f"cannot resume from this region: {problem}")

    @property
    def steps(self) -> int:
        return self._ctl.steps

    @property
    def dirty_rate(self) -> float | None:
        return self._ctl.dirty_rate or None

    @property
    def replaying(self) -> bool:
        return self._ctl.pattern == lib.PATTERN_REPLAY

    def timeline(self) -> ReplayTimeline | None:
        """A replay's timeline from its schedule (call only when ``control_problem()`` is None)."""
        if not self.replaying:
            return None
        if self._timeline is None:
            ctl = self._ctl
            at = ffi.cast("struct replay_interval *",
                          self._base + (1 + ctl.table_pages) * lib.GUEST_PAGE_SIZE + NAME_MAX)
            intervals = [(i.start, i.end, i.steps_end) for i in ffi.unpack(at, ctl.replay_intervals)]
            self._timeline = ReplayTimeline(intervals, ctl.replay_seconds)
        return self._timeline

    def pace(self):
        """What the writer paces by: a replay's timeline, a steady rate, or None (unlimited)."""
        timeline = self.timeline()
        if timeline is not None:
            return timeline
        return Steady(self.dirty_rate) if self.dirty_rate else None

    @property
    def replay_name(self) -> str:
        ctl = self._ctl
        at = self._base + (1 + ctl.table_pages) * lib.GUEST_PAGE_SIZE
        return ffi.buffer(at, min(ctl.replay_name_len, NAME_MAX))[:].decode("utf-8", "replace")

    def replay_position(self) -> dict:
        """Which trace, loop and interval the replay is at (for stats)."""
        timeline = self.timeline()
        steps = self.steps
        loop, interval = timeline.position(steps)
        return {"trace": self.replay_name, "loop": loop, "interval": interval,
                "intervals": len(timeline.intervals), "loop_steps": timeline.steps,
                "loop_seconds": timeline.seconds,
                "at_s": round(timeline.seconds_at(steps % timeline.steps), 6)}   # into the loop

    def describe(self) -> dict:
        """Settings for stats (call only when ``control_problem()`` is None)."""
        ctl = self._ctl
        pattern = _PATTERN_NAMES[ctl.pattern]
        if ctl.pattern == lib.PATTERN_REPLAY:
            pattern += f":{self.replay_name}"
        elif ctl.pattern == lib.PATTERN_HOT:
            pattern += f":{ctl.hot_pages / ctl.data_pages:.4g}:{ctl.hot_threshold / 2**64:.4g}"
        return {
            "pattern": pattern,
            "fill": _FILL_NAMES[ctl.fill],
            "seed": ctl.seed,
            "dirty_rate": self.dirty_rate,
            "size": self.mapping.size,
        }

    @property
    def tag(self) -> str:
        length = min(self._ctl.tag_len, lib.GUEST_TAG_MAX)
        return ffi.buffer(self._ctl.tag, length)[:].decode("utf-8", "replace")

    def set_tag(self, tag: str) -> None:
        data = tag.encode("utf-8")
        if len(data) > lib.GUEST_TAG_MAX:
            raise GuestError(f"tag of {len(data)} bytes: at most {lib.GUEST_TAG_MAX} bytes of UTF-8")
        ffi.memmove(self._ctl.tag, data.ljust(lib.GUEST_TAG_MAX, b"\0"), lib.GUEST_TAG_MAX)
        self._ctl.tag_len = len(data)

    # --- running and checking --------------------------------------------------------------------

    def run(self, count: int) -> int:
        """Do ``count`` steps; returns the step counter after them."""
        return lib.guest_run(self._base, count)

    def page_written_by(self, step: int) -> int:
        """Region page index that step ``step`` (0-based) writes."""
        return lib.guest_pick(self._base, step)

    def check(self, deep: bool = True) -> CheckResult:
        """Self-check; ``deep`` also verifies every page body, not just headers and the table."""
        return _checked(lambda problem, detail: lib.guest_check(self._base, self.mapping.size, int(deep),
                                                                 problem, detail))

    def check_pages(self, runs: bytes, deep: bool = False) -> CheckResult:
        """``check`` of the control block and of the data pages in ``runs`` (native 64-bit
        (first region page, count) pairs): what a downtime can afford, whatever the region's size."""
        return _check_pages(self._base, self.mapping.size, runs, deep)

    def digest(self) -> str:
        return region_digest(self.mapping.buffer)

    def discard(self, runs: bytes) -> tuple[int, int]:
        """Drop the pages of ``runs`` (native 64-bit (first region page, count) pairs) from the
        mapping with MADV_DONTNEED, in C and batched (process_madvise on itself, 1024 runs a
        call, one TLB flush each): a post-copy switch-over may drop 100k scattered runs.
        Returns (pages, runs) dropped; GuestError if a run is outside the region (nothing
        dropped), OSError if madvise fails."""
        pairs = ffi.from_buffer("uint64_t[]", runs)
        done = ffi.new("uint64_t[2]")
        rc = lib.discard_pages(self._base, self.mapping.size, pairs, len(runs) // 16, done)
        if rc == lib.DISCARD_OUTSIDE:
            raise GuestError(f"discard: pages outside the region's {self.mapping.size // lib.GUEST_PAGE_SIZE} pages")
        if rc < 0:
            raise OSError(-rc, f"discard: madvise(MADV_DONTNEED) after {done[1]} runs: {os.strerror(-rc)}")
        return done[0], done[1]


def check_pages_in(region, runs: bytes, deep: bool = False) -> CheckResult:
    """``Workload.check_pages`` over ``region``, a guest's whole region as another process maps
    it (a receiver's view of its restore guest's memfd): the same C check, with no request to
    the guest and its round trip. The guest must not run meanwhile (inside a downtime it does
    not). The bytes are hostile like any page: the check reads only inside ``region``."""
    return _check_pages(ffi.from_buffer("uint8_t[]", region), len(region), runs, deep)


def _check_pages(base, size: int, runs: bytes, deep: bool) -> CheckResult:
    """The C check of the control block and of the data pages in ``runs`` over ``size`` bytes at ``base``."""
    pairs = ffi.from_buffer("uint64_t[]", runs)
    return _checked(lambda problem, detail: lib.guest_check_pages(base, size, int(deep), pairs, len(runs) // 16,
                                                                   problem, detail))


def _checked(check) -> CheckResult:
    """Run one of the C self-checks, ``check(problem, detail)`` returning the first bad page or
    -1, and word its outcome."""
    problem = ffi.new("int *")
    detail = ffi.new("uint64_t[2]")
    page = check(problem, detail)
    if page < 0:
        return CheckResult(clean=True)
    return CheckResult(False, page, PROBLEMS[problem[0]].format(detail[0], detail[1]))
