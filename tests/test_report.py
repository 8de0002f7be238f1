"""Rendering a hand-written report: table, summary, live line, CLI and plot."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from migrator.cli import report as report_cli
from migrator.cli.main import COMMANDS
from migrator.core.errors import MigratorError
from migrator.source.report import RoundStats
from migrator.cli.render import (
    format_round_table,
    format_summary,
    load_report,
    plot_report,
    report_rounds,
    summarize,
)

MiB = 1 << 20
ROUND = dict(
    round=0, dirty_pages=131072, zero_pages=1000, bytes_raw=512 * MiB, bytes_wire=128 * MiB,
    scan_s=0.0012, read_s=0.150, compress_s=0.900, send_s=0.0423, duration_s=1.2,
    dirty_rate=0.0, bandwidth=447e6, expected_downtime_ms=393.2, throttle=0.0, exchange_s=0.001,
    pages_left=24000, expected_fixed_ms=3.0,
)
REPORT = {
    "schema": {"name": "migrator.migration", "version": 1}, "migrator_version": "0.1.0",
    "started_at": "2026-12-03T15:00:00.000Z", "id": "0123abcd", "peer": "127.0.0.1:7000",
    "kind": "migration",
    "settings": {"downtime_ms": 50, "max_rounds": 30, "tracker": "wp-async", "compress": "zstd:1",
                 "streams": 1, "bandwidth": None, "verify": "pages", "tls": False,
                 "size_bytes": 512 * MiB, "pages": 131072, "frame_macs": False, "mode": "precopy"},
    "rounds": [
        ROUND,
        dict(ROUND, round=1, dirty_pages=24000, zero_pages=0, bytes_raw=24000 * 4096, bytes_wire=30720000,
             read_s=0.031, compress_s=0.2, send_s=0.011, duration_s=0.25, dirty_rate=20000.0,
             bandwidth=393e6, expected_downtime_ms=72.5, throttle=0.0, exchange_s=0.001, pages_left=5000, expected_fixed_ms=3.0),
        dict(ROUND, round=2, dirty_pages=5000, zero_pages=0, bytes_raw=5000 * 4096, bytes_wire=8192000,
             read_s=0.006, compress_s=0.04, send_s=0.003, duration_s=0.05, dirty_rate=19800.5,
             bandwidth=410e6, expected_downtime_ms=4.25, throttle=0.2, exchange_s=0.001, pages_left=1000, expected_fixed_ms=3.0),
    ],
    "rule": "downtime-target", "rule_reason": "expected downtime 4.2 ms is within the 50 ms target",
    "throttle_max": 0.2, "rtt_ms": 0.1, "final_pages": 1000,
    "downtime_ms": 4.2,
    "downtime_parts_ms": {"freeze": 0.1, "final_scan": 0.3, "final_send": 2.0, "verify": 0.5,
                          "region_digest": 0.0, "commit": 0.8, "resume": 0.5},
    "total_s": 1.5, "pages_sent": 160072, "bytes_raw": 655654912, "pages_lent": 0, "bytes_wire": 173862912,
    "verified": True, "result": "committed", "committed": True, "error": None, "control": None, "postcopy": None,
}


def test_round_table_has_a_row_per_round_with_its_numbers():
    header, *rows = format_round_table(REPORT).splitlines()
    assert header.split()[:3] == ["round", "dirty", "MiB"] and "exp ms" in header and "thr %" in header
    assert len(rows) == 3 and len({len(line) for line in [header, *rows]}) == 1   # fixed width
    assert rows[0].split() == ["0", "131072", "512.0", "128.0", "4.00", "1.2", "150.0", "900.0", "42.3",
                               "0", "447", "393.2", "0"]
    assert rows[1].split() == ["1", "24000", "93.8", "29.3", "3.20", "1.2", "31.0", "200.0", "11.0",
                               "20000", "393", "72.5", "0"]
    assert rows[2].split()[-4:] == ["19800", "410", "4.2", "20"]


def test_summary():
    lines = format_summary(REPORT).splitlines()
    assert lines[0].split() == ["result", "committed,", "verified", "(verify=pages)"]
    assert lines[1] == "rule      downtime-target: expected downtime 4.2 ms is within the 50 ms target"
    assert lines[2] == "rounds    3 in 1.50 s, throttle up to 20 %"
    assert lines[3] == ("downtime  4.2 ms (target 50 ms): freeze 0.1, final_scan 0.3, final_send 2.0, "
                        "verify 0.5, region_digest 0.0, commit 0.8, resume 0.5")
    assert lines[4] == "sent      160072 pages, 625.3 MiB raw, 165.8 MiB on the wire (ratio 3.77)"
    assert len(lines) == 5


def test_failed_report_with_missing_totals():
    failed = dict(REPORT, result="failed", verified=False, error="receiver closed the connection",
                  downtime_ms=None, downtime_parts_ms={}, total_s=None, rounds=REPORT["rounds"][:1])
    failed["bytes_wire"] = None
    text = format_summary(failed)
    assert "failed, NOT verified" in text and "downtime  - ms (target 50 ms)" in text
    assert "MiB on the wire (ratio -)" in text and text.endswith("error     receiver closed the connection")
    assert summarize(failed)["rounds"] == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schema": None}, "not a migrator report: it has no 'schema'"),
        ({"schema": {"name": "migrator.backup", "version": 1}}, "its schema is 'migrator.backup'"),
        ({"schema": {"name": "migrator.migration", "version": 9}}, "migrator.migration version 9; this migrator reads version 1"),
        ({"kind": "backup"}, "'kind': invalid enum value 'backup'"),
        ({"result": None}, "'result': expected str, got null"),
        ({"rounds": {}}, "'rounds': expected array, got object"),
        ({"downtime_ms": "4.2"}, "'downtime_ms': expected float | null, got str"),
        ({"verified": 1}, "'verified': expected bool, got int"),
        ({"downtime_parts_ms": {"freeze": "x"}}, r"'downtime_parts_ms\[...\]': expected float, got str"),
        ({"rounds": [{k: v for k, v in ROUND.items() if k != "send_s"}]}, r"'rounds\[0\]': object missing required field send_s"),
        ({"rounds": [dict(ROUND, dirty_pages=True)]}, r"'rounds\[0\].dirty_pages': expected int, got bool"),
        ({"rounds": [7]}, r"'rounds\[0\]': expected object, got int"),
        ({"settings": dict(REPORT["settings"], streams="2")}, "'settings.streams': expected int, got str"),
    ],
)
def test_bad_reports_get_one_line_naming_the_problem(tmp_path, change, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(dict(REPORT, **change)))
    with pytest.raises(MigratorError, match=message) as err:
        load_report(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(MigratorError, match="cannot read the report"):
        load_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MigratorError, match="not JSON"):
        load_report(tmp_path / "bad.json")


def test_rounds_ignore_unknown_keys_and_default_the_throttle():
    row = {k: v for k, v in ROUND.items() if k != "throttle"} | {"future_field": 1}
    assert report_rounds(dict(REPORT, rounds=[row])) == [RoundStats(**ROUND)]


def run_cli(argv, capsys):
    parser = argparse.ArgumentParser()
    report_cli.add_arguments(parser)
    code = report_cli.run(parser.parse_args(argv))
    return code, capsys.readouterr()


def test_report_command(tmp_path, capsys):
    assert COMMANDS["report"][0] == "migrator.cli.report"
    path = tmp_path / "run.json"
    path.write_text(json.dumps(REPORT))
    code, out = run_cli([str(path)], capsys)
    assert code == 0
    assert out.out == format_round_table(REPORT) + "\n\n" + format_summary(REPORT) + "\n"
    code, out = run_cli([str(path), "--json"], capsys)
    assert code == 0 and json.loads(out.out) == REPORT, "--json prints the document --report wrote"
    assert summarize(REPORT)["ratio"] == pytest.approx(655654912 / 173862912)


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is missing (pip install migrator[plot])")
    path, png = tmp_path / "run.json", tmp_path / "out.png"
    path.write_text(json.dumps(REPORT))
    code, out = run_cli([str(path), "--plot", str(png)], capsys)
    assert code == 0 and f"plot written to {png}" in out.err
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    with pytest.raises(MigratorError, match="no rounds to plot"):
        plot_report(dict(REPORT, rounds=[]), png)


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    """A Python without site-packages really lacks matplotlib; migrator comes from the source tree."""
    source_tree = Path(__import__("migrator").__file__).parent.parent
    code = (
        "import sys; from migrator.cli.render import plot_report; from migrator.core.errors import MigratorError\n"
        f"try: plot_report({REPORT!r}, {str(tmp_path / 'x.png')!r})\n"
        "except MigratorError as e: print(e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(source_tree))
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "plotting needs matplotlib: pip install migrator[plot]", out.stderr
