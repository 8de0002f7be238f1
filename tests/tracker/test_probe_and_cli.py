"""``migrator probe`` and ``migrator track``: real checks, real scratch processes."""

from __future__ import annotations

import argparse
import json

import pytest

from migrator.cli import options, probe as probe_cli, track as demo_cli
from migrator.tracker import choose_tracker, features, open_tracker, required_uffd_mode
from migrator.tracker.probe import probe
from migrator.tracker.scratch import ScratchProcess


def run_command(module, argv: list[str]) -> int:
    """What ``migrator.cli`` does for one subcommand."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_probe_reports_what_works_and_its_recommendation_works():
    result = probe()
    assert result.wp_async == (features.wp_async_missing() is None)
    assert result.tracker == choose_tracker()
    assert set(result.reasons) == {k for k in ("userfaultfd", "wp_async", "sync_wp", "pagemap_scan", "soft_dirty")
                                   if not getattr(result, k)}
    if result.read_rights.read_child and result.tracker != "soft-dirty":
        mode = required_uffd_mode(result.tracker) or "none"
        with ScratchProcess(1 << 20, mode) as child:  # what probe recommends really opens here
            open_tracker(result.tracker, pid=child.pid, regions=[child.region], uffd=child.take_uffd()).close()


def test_probe_json(capsys):
    code = run_command(probe_cli, ["--json"])
    data = json.loads(capsys.readouterr().out)
    assert {"kernel", "userfaultfd", "wp_async", "pagemap_scan", "soft_dirty", "tracker", "features",
            "read_rights"} <= set(data)
    assert data["wp_async"] is (features.wp_async_missing() is None)
    assert code == (0 if data["tracker"] != "full" else 1)
    if data["wp_async"]:
        assert "WP_ASYNC" in data["features"] and data["tracker"] == "wp-async"


def test_probe_table(capsys):
    run_command(probe_cli, [])
    out = capsys.readouterr().out
    rows = {line[:18].strip(): line[18:].strip() for line in out.splitlines()}  # name column, value
    assert rows["tracker"] == choose_tracker()
    assert rows["WP_ASYNC in effect"].startswith("yes" if features.wp_async_missing() is None else "no: ")


@pytest.mark.parametrize("kind", ["wp-async", "full"])
def test_track_demo_prints_rounds(capsys, kind):
    reason = features.wp_async_missing() if kind == "wp-async" else features.pagemap_scan_missing()
    if reason:
        pytest.skip(reason)
    code = run_command(demo_cli, ["--size", "8M", "--rounds", "3", "--interval", "0.1", "--rate", "5000",
                                  "--tracker", kind])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"tracker {kind}: scratch process") and "2048 pages populated" in lines[0]
    rounds = [list(map(float, line.split())) for line in lines[2:5]]
    assert [int(r[0]) for r in rounds] == [1, 2, 3]
    for _, written, reported, _, scan_ms in rounds:
        assert written > 0 and scan_ms >= 0
        if kind == "full":
            assert reported == 2048
        else:
            assert 0 < reported <= written
    assert lines[5].startswith(f"{int(sum(r[2] for r in rounds))} pages reported in 3 collects")


@pytest.mark.parametrize(("text", "size"), [("64M", 64 << 20), ("1G", 1 << 30), ("8192", 8192), ("4KiB", 4096)])
def test_sizes_parse(text, size):
    assert options.size(text) == size


@pytest.mark.parametrize("text", ["12Q", "", "100", "-4K"])
def test_bad_sizes_are_refused_naming_them(text):
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace("'", ".")):
        options.size(text)
