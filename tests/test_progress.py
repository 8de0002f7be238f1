"""The progress a running migration publishes: rendered from recorded values (no terminal), and
the stream of a real migration against its report."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest
import trio

from migrator.cli.progress import ProgressView, format_json, format_live, format_settled
from migrator.core.documents import Schema, convert
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.source.migration import MigrateSettings, SourceMigration
from migrator.source.progress import PERIOD_S, Progress
from migrator.source.report import RoundStats
from migrator.tracker.features import wp_async_missing
from test_e2e_loopback import _receiver

MiB = 1 << 20
GiB = 1 << 30
ROUND = RoundStats(round=2, dirty_pages=24000, zero_pages=0, bytes_raw=24000 * 4096, bytes_wire=30720000,
                   scan_s=0.001, read_s=0.03, compress_s=0.2, send_s=0.01, duration_s=0.25, dirty_rate=20000.0,
                   bandwidth=393e6, expected_downtime_ms=72.5, throttle=0.2)
LIVE = Progress(schema=Schema("migrator.progress"), id="ab12", phase="precopy", elapsed_s=12.34, round=3,
                round_pages=5000, round_sent_bytes=12 * MiB, remaining_bytes=7 * MiB + 512 * 1024,
                transferred_wire_bytes=int(1.5 * GiB), total_bytes=4 * GiB, dirty_rate=19800.0, throughput=118e6,
                expected_downtime_ms=72.5, downtime_target_ms=50, throttle=0.2, eta_s=0.066)
# the widest values each field can take in practice
WIDEST = Progress(schema=Schema("migrator.progress"), id="ab12", phase="switchover", elapsed_s=99999.9, round=999,
                  round_pages=1 << 40, round_sent_bytes=999 * GiB, remaining_bytes=999 * GiB,
                  transferred_wire_bytes=999 * GiB, total_bytes=999 * GiB, dirty_rate=9.9e8, throughput=99e9,
                  expected_downtime_ms=99999.0, downtime_target_ms=99999.0, throttle=0.99, eta_s=99999.9)


def test_the_live_line_shows_every_figure_in_100_columns():
    line = format_live(LIVE)
    for text in (" 12.3s round 3 ", "sent 12.0M/19.5M", "wire 1.5G", "dirty 19.8k/s", " 113M/s",
                 "exp 72/50ms", "thr 20%", "eta 0.1s"):
        assert text in line, (text, line)
    widest = format_live(WIDEST)
    assert len(widest) <= 100 and widest.endswith("eta 27h46m") and "\n" not in line


def test_a_settled_line_per_round_fits_100_columns():
    line = format_settled(ROUND, 50)
    assert line.split()[:7] == ["round", "2", "24000", "pages", "93.8M", "raw", "29.3M"]
    for text in (" 0.2s ", " 375M/s", "dirty 20.0k/s", "exp 72/50ms"):
        assert text in line, (text, line)
    widest = dataclasses.replace(ROUND, **{
                           "round": 999, "dirty_pages": 99_999_999, "bytes_raw": 999 * GiB, "bytes_wire": 999 * GiB,
                           "duration_s": 9999.99, "bandwidth": 99e9, "dirty_rate": 9.9e8,
                           "expected_downtime_ms": 99999.0, "throttle": 0.99})
    assert line.endswith("thr 20%")
    assert len(format_settled(widest, 99999)) <= 100 and format_settled(widest, 99999).endswith("thr 99%")


def test_a_terminal_gets_the_live_line_rewritten_and_settled_lines_kept():
    out = io.StringIO()
    view = ProgressView(out, live=True)
    settled = dataclasses.replace(LIVE, settled=ROUND)
    for p in (LIVE, LIVE, settled, LIVE):
        view(p)
    view.close()
    text = out.getvalue()
    assert text.count("\r" + format_live(LIVE) + "\x1b[K") == 3
    assert "\r\x1b[K" + format_settled(ROUND, 50) + "\n" in text, "the settled line replaces the live one"
    assert text.endswith("\r\x1b[K") and text.count("\n") == 1


def test_a_pipe_gets_settled_lines_only_and_json_lines_get_everything():
    out = io.StringIO()
    view = ProgressView(out, live=False)
    settled = dataclasses.replace(LIVE, settled=ROUND)
    for p in (LIVE, settled, LIVE):
        view(p)
    assert out.getvalue() == format_settled(ROUND, 50) + "\n"
    out = io.StringIO()
    view = ProgressView(out, live=True, json_lines=True)
    for p in (LIVE, settled):
        view(p)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [convert(Progress, line) for line in lines] == [LIVE, settled]
    assert lines[0]["schema"] == {"name": "migrator.progress", "version": 1}
    assert format_json(LIVE) == out.getvalue().splitlines()[0]


@pytest.mark.skipif(wp_async_missing() is not None, reason=f"needs userfaultfd WP_ASYNC: {wp_async_missing()}")
async def test_the_progress_of_a_real_migration_agrees_with_its_report(sockdir):
    seen: list[Progress] = []
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=32 * MiB, dirty_rate=2000) as guest:
        await trio.sleep(0.3)
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                outcomes: list[dict] = []
                address = await _receiver(nursery, outcomes)
                migration = SourceMigration(guest.control, address, MigrateSettings(bandwidth=16 * MiB),
                                            on_progress=seen.append)
                report = await migration.run()
                nursery.cancel_scope.cancel()
    with GuestClient(outcomes[0]["guest_control"]) as client:
        client.quit()       # the resumed copy is not under test
    settled = [p.settled for p in seen if p.settled is not None]
    assert tuple(settled) == report.rounds, "one settled snapshot per round, the report's own values"
    assert seen[-1].phase == "committed" and seen[-1].settled is None
    live = [p for p in seen if p.settled is None]
    gaps = [b.elapsed_s - a.elapsed_s for a, b in zip(live, live[1:])]
    assert sorted(gaps)[len(gaps) // 2] <= 0.25, "at least four snapshots a second (the median gap)"
    assert all(b.elapsed_s >= a.elapsed_s for a, b in zip(seen, seen[1:]))
    during = [p for p in live if p.phase == "precopy" and p.round == 0 and p.round_sent_bytes > 0]
    assert during, "round 0 is seen while it runs"
    assert any(p.remaining_bytes > 0 and p.eta_s is not None for p in during)
    assert during[-1].throughput == pytest.approx(16 * MiB, rel=0.2), "on the wire, under the cap"
    assert seen[-1].transferred_wire_bytes == report.bytes_wire
    assert PERIOD_S <= 0.25
