"""``guest --replay``: a trace laid onto the region, replayed page for page with its timing."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import trio
from harness.traces import PAGE, sweep_trace

from migrator.destination.engine import DestinationMigration, ReceiveSettings
from migrator.core.errors import GuestError
from migrator.core.model import Region
from migrator.guest.client import GuestClient
from migrator.guest.layout import Geometry, Settings
from migrator.guest.mapping import RegionMapping
from migrator.guest.pacing import Pacer
from migrator.guest.replay import ReplayTimeline, load_plan, plan
from migrator.guest.spawn import spawn_guest
from migrator.guest.workload import Workload
from migrator.native.workload import ffi
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.trace.file import write_trace
from migrator.trace.model import TraceMapping, TraceRecorder, interval_pages
from migrator.tracker import open_tracker
from migrator.tracker.features import wp_async_missing
from migrator.transport import serve

HEAP = TraceMapping(0x10000, 0x10000 + 16 * PAGE, "[heap]")
ANON = TraceMapping(0x7F0000000000, 0x7F0000000000 + 8 * PAGE, "")
needs_wp_async = pytest.mark.skipif(wp_async_missing() is not None,
                                    reason=f"needs userfaultfd WP_ASYNC: {wp_async_missing()}")


def small_trace():
    recorder = TraceRecorder(page_size=PAGE, pid=7, command="prog", interval_s=0.1, stopped_ms=0.1)
    recorder.add(1.1, 0.1, [HEAP], [(HEAP, [(HEAP.start + 2 * PAGE, 3)])])
    recorder.add(1.2, 0.1, [HEAP, ANON], [(HEAP, [(HEAP.start + 14 * PAGE, 2)]), (ANON, [(ANON.start, 2)])])
    recorder.add(1.2, 0.0, [HEAP, ANON], [(ANON, [(ANON.start + 7 * PAGE, 1)])])   # lasts no time
    recorder.add(1.4, 0.1, [HEAP, ANON], [])                                   # after a gap, nothing
    return recorder.trace()


def data_pages_of(trace, interval):
    """The data pages (0-based) ``interval`` of ``trace`` becomes in a replay: mappings back to back."""
    bases, at = {}, 0
    for index, mapping in enumerate(trace.mappings):
        bases[index] = at
        at += (mapping.end - mapping.start) // PAGE
    return {bases[i] + (address - trace.mappings[i].start) // PAGE + k
            for i, runs in interval.written for address, count in runs for k in range(count)}


def test_plan_lays_the_mappings_back_to_back_on_predicts_time_axis():
    p = plan(small_trace(), "small.trace")
    assert p.data_pages == 16 + 8
    # heap pages 2..4, then heap 14..15 and anon 0..1 touch (16 + 0 follows 15): one run
    assert p.runs == ((2, 3), (14, 4))
    assert p.intervals == (pytest.approx((0.0, 0.1, 3)), pytest.approx((0.1, 0.2, 7)), pytest.approx((0.3, 0.4, 7)))
    assert p.seconds == pytest.approx(0.4) and p.steps == 7
    geometry = p.geometry()
    assert geometry.data_pages >= 24 and geometry.schedule_pages == 1
    with pytest.raises(GuestError, match="too small to replay small.trace"):
        p.geometry(16 * PAGE)
    assert p.geometry(1 << 20).size == 1 << 20


def test_a_trace_without_writes_is_refused():
    recorder = TraceRecorder(page_size=PAGE, pid=7, command="idle", interval_s=0.1, stopped_ms=0.1)
    recorder.add(0.1, 0.1, [HEAP], [])
    with pytest.raises(GuestError, match="no page written"):
        plan(recorder.trace(), "idle.trace")


def replay_workload(trace, size=None):
    p = plan(trace, "t.trace")
    geometry = p.geometry(size)
    return Workload.create(RegionMapping(geometry.size), Settings(replay=p)), geometry


def test_steps_write_the_trace_interval_by_interval_and_loop():
    trace = sweep_trace(pages=(300, 200), hot=20, sweep=60, intervals=12)
    workload, geometry = replay_workload(trace)
    first = geometry.first_data_page
    steps = 0
    for loop in range(2):
        for interval in trace.intervals:
            picked = {workload.page_written_by(n) - first for n in range(steps, steps + interval.dirty_pages)}
            assert picked == data_pages_of(trace, interval)
            steps += interval.dirty_pages
    workload.run(steps + 5)
    assert workload.check().clean
    position = workload.replay_position()
    assert (position["loop"], position["interval"], position["trace"]) == (2, 0, "t.trace")
    assert workload.describe()["pattern"] == "replay:t.trace"


def test_a_damaged_schedule_is_refused():
    workload, geometry = replay_workload(small_trace())
    assert workload.control_problem() is None
    schedule = ffi.cast("uint8_t *", workload.mapping.pointer) + (1 + geometry.table_pages) * PAGE
    schedule[128] ^= 1   # a byte of the first interval
    assert "replay schedule is damaged" in workload.control_problem()


def test_timeline_spreads_each_interval_and_loops():
    timeline = ReplayTimeline([(0.0, 0.1, 100), (0.3, 0.5, 300)], seconds=0.6)
    assert timeline.steps_at(0.05) == pytest.approx(50)
    assert timeline.steps_at(0.2) == pytest.approx(100)          # between intervals: nothing
    assert timeline.steps_at(0.4) == pytest.approx(200)
    assert timeline.steps_at(0.55) == pytest.approx(300)
    assert timeline.steps_at(0.65) == pytest.approx(350)         # loop 1
    for steps in (1, 50, 100, 101, 300, 301, 777):
        assert timeline.steps_at(timeline.seconds_at(steps)) == pytest.approx(steps)
    assert timeline.position(0) == (0, 0) and timeline.position(150) == (0, 1) and timeline.position(300) == (1, 0)


def test_pacer_follows_a_timeline_and_resumes_where_the_steps_are():
    timeline = ReplayTimeline([(0.0, 0.1, 100), (0.3, 0.5, 300)], seconds=0.6)
    pacer = Pacer(timeline, start=10.0)
    done = []
    for tick in range(1, 61):                                      # every 10 ms for one loop
        due = pacer.due(10.0 + tick * 0.01)
        pacer.record(due)
        done.append(due)
    assert sum(done[:10]) == 100 and sum(done[10:30]) == 0 and sum(done[30:50]) == 200
    resumed = Pacer(timeline, start=50.0, done=100)                # a copy resumed after interval 0
    assert resumed.due(50.05) == 0 and resumed.seconds_until_due(50.0) == pytest.approx(0.2 + 0.001)


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "sweep.trace"
    trace = sweep_trace(pages=(1024, 512), hot=64, sweep=128, intervals=6, seconds=0.05)
    write_trace(path, trace)
    return path, trace


def test_cli_refusals_are_one_line(tmp_path, trace_file):
    path, _ = trace_file
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"MIGTRACE" + b"\0" * 20)
    for argv, message in [
        (["--replay", str(bad)], "bad.trace: corrupt trace"),
        (["--replay", str(path), "--pattern", "hot:0.1:0.9"], "--pattern cannot be used with --replay"),
        (["--replay", str(path), "--size", "64K"], "too small to replay sweep.trace"),
    ]:
        run = subprocess.run([sys.executable, "-m", "migrator", "guest", *argv], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode != 0 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


@needs_wp_async
def test_a_replaying_guest_writes_exactly_each_intervals_pages(sockdir, trace_file):
    """Tracked with WP_ASYNC, interval by interval (the guest pauses itself at each interval's
    last step): the data pages written are exactly the trace's, and the only others are the
    control block and version-table pages the steps commit to."""
    path, trace = trace_file
    geometry = load_plan(path).geometry()
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=None, replay=path, extra_args=["--paused"]) as guest:
        client = guest.client()
        attachment = client.attach()
        region = Region(attachment.layout.regions[0].start, geometry.size)
        first = geometry.first_data_page
        bookkeeping = set(range(first - geometry.schedule_pages))     # control block + table
        with open_tracker("wp-async", pid=guest.pid, regions=[region], uffd=attachment.uffd) as tracker:
            tracker.arm()
            steps = 0
            for interval in trace.intervals:
                steps += interval.dirty_pages
                client.resume(until_step=steps)
                assert client.pause(at_step=steps) == steps
                written = {(address - region.start) // PAGE + k for address, count in tracker.collect()
                           for k in range(count)}
                assert {p - first for p in written if p >= first} == data_pages_of(trace, interval)
                assert {p for p in written if p < first} <= bookkeeping
        stats = client.stats()
        assert stats["replay"]["trace"] == "sweep.trace" and stats["replay"]["loop"] == 1
        assert stats["pattern"] == "replay:sweep.trace" and client.check()["clean"]


@needs_wp_async
async def test_a_replaying_guest_migrates_verified_and_replays_on(sockdir, trace_file):
    path, trace = trace_file
    outcomes = []

    async def handle(channel):
        outcomes.append((await DestinationMigration(channel, ReceiveSettings(control_dir=sockdir),
                                                    log=lambda line: None).run()).to_dict())

    with spawn_guest(os.path.join(sockdir, "src.sock"), size=None, replay=path) as guest:
        await trio.sleep(0.3)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                address = await nursery.start(functools.partial(serve, "127.0.0.1:0", handle, token=None))
                report = (await SourceMigration(guest.control, address, MigrateSettings(verify="full")).run()).to_dict()
                nursery.cancel_scope.cancel()
        assert report["verified"] and report["result"] == "committed"
    client = GuestClient(outcomes[0]["guest_control"])
    try:
        before = client.stats()
        assert before["replay"]["trace"] == "sweep.trace"
        await trio.sleep(0.5)
        after = client.stats()
        assert after["steps"] > before["steps"] and client.check()["clean"]
    finally:
        client.quit()
