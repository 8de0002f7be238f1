"""The command line's outputs and option values: a link at an output path is refused before
anything runs (nothing written through it), as are unplottable paths and bad numbers, each in
one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from migrator.cli.main import main

from test_report import REPORT


def migrator(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True, timeout=timeout)


# Each command with its output option pointing at PATH; nothing else it needs exists, so the only
# way for it to fail with the expected line is the output check that runs before everything else.
OUTPUT_OPTIONS = {
    "migrate --report": ["migrate", "--guest", "G/none.sock", "--to", "127.0.0.1:9", "--report", "PATH"],
    "migrate --plot": ["migrate", "--guest", "G/none.sock", "--to", "127.0.0.1:9", "--plot", "PATH"],
    "report --plot": ["report", "REPORT", "--plot", "PATH"],
    "checkpoint --report": ["checkpoint", "--guest", "G/none.sock", "--dir", "G/image", "--report", "PATH"],
    "receive --report": ["receive", "--listen", "127.0.0.1:0", "--once", "--report", "PATH"],
    "restore --report": ["restore", "--dir", "G/no-image", "--report", "PATH"],
}


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim" / "precious.png"
    path.parent.mkdir()
    path.write_bytes(b"keep me")
    return path


def _argv(template: list[str], tmp_path, path) -> list[str]:
    report = tmp_path / "run.json"
    report.write_text(json.dumps(REPORT))
    return [str(path) if a == "PATH" else str(report) if a == "REPORT" else a.replace("G/", f"{tmp_path}/")
            for a in template]


@pytest.mark.parametrize("option", OUTPUT_OPTIONS)
def test_a_link_at_an_output_path_is_refused_in_one_line(option, tmp_path, victim):
    link = tmp_path / "out.png"
    link.symlink_to(victim)
    result = migrator(*_argv(OUTPUT_OPTIONS[option], tmp_path, link))
    assert result.returncode == 2
    assert result.stderr == f"migrator: OutputError: {link}: is a symbolic link; refusing to write through it\n"
    assert victim.read_bytes() == b"keep me" and link.is_symlink()


@pytest.mark.parametrize("option", OUTPUT_OPTIONS)
def test_an_output_in_a_missing_directory_is_refused_before_anything_runs(option, tmp_path):
    path = tmp_path / "missing" / "out.png"
    result = migrator(*_argv(OUTPUT_OPTIONS[option], tmp_path, path))
    assert result.returncode == 2
    assert result.stderr == f"migrator: OutputError: {path}: directory {path.parent} does not exist\n"


def test_a_link_in_the_experiment_directory_is_refused_before_any_migration(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").symlink_to(victim)
    result = migrator("experiment", "--quick", "--no-plots", "--out", str(out), timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith("results.json: is a symbolic link; refusing to write through it\n")
    assert result.stderr.count("\n") == 1 and victim.read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_report_plot_to_a_format_matplotlib_cannot_draw_is_one_line(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is missing (pip install migrator[plot])")
    report = tmp_path / "run.json"
    report.write_text(json.dumps(REPORT))
    result = migrator("report", str(report), "--plot", str(tmp_path / "x.json"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"migrator: OutputError: {tmp_path / 'x.json'}: matplotlib cannot draw .json files")
    assert result.stderr.count("\n") == 1 and result.stdout == ""       # refused before the report is printed
    assert not (tmp_path / "x.json").exists()


def test_report_plot_replaces_a_file_and_draws_the_format_its_suffix_names(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is missing (pip install migrator[plot])")
    report, svg = tmp_path / "run.json", tmp_path / "plot.svg"
    report.write_text(json.dumps(REPORT))
    svg.write_text("old")
    result = migrator("report", str(report), "--plot", str(svg))
    assert result.returncode == 0, result.stderr
    assert b"<svg" in svg.read_bytes()[:500]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.svg", "run.json"]


def test_report_and_plot_may_not_name_one_file(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is missing (pip install migrator[plot])")
    same = str(tmp_path / "x.png")
    result = migrator("migrate", "--guest", "none", "--to", "127.0.0.1:9", "--report", same, "--plot", same)
    assert result.returncode == 2 and result.stderr == f"migrator: OutputError: --report and --plot both name {same}\n"


BAD_VALUES = [
    ("migrate", "--downtime-ms", "0"), ("migrate", "--downtime-ms", "nan"), ("migrate", "--streams", "0"),
    ("migrate", "--streams", "65"), ("migrate", "--max-rounds", "0"), ("migrate", "--round-timeout", "0"),
    ("migrate", "--round-timeout", "inf"), ("migrate", "--bandwidth", "0"), ("migrate", "--compress", "zstd:99"),
    ("checkpoint", "--downtime-ms", "0"), ("checkpoint", "--every", "0"), ("checkpoint", "--every", "-1"),
    ("checkpoint", "--keep", "0"), ("checkpoint", "--count", "0"), ("checkpoint", "--compress", "lz4"),
    ("receive", "--idle-timeout", "0"), ("receive", "--prepare", "0"),
    ("track", "--rounds", "0"), ("track", "--rate", "-5"), ("track", "--interval", "0"),
    ("experiment", "--max-rounds", "0"), ("experiment", "--repeats", "1.5"), ("experiment", "--downtime-ms", "-1"),
]
REQUIRED = {
    "migrate": ["--guest", "g.sock", "--to", "127.0.0.1:9"],
    "checkpoint": ["--guest", "g.sock", "--dir", "image"],
    "receive": ["--listen", "127.0.0.1:0"],
    "track": [],
    "experiment": [],
}


@pytest.mark.parametrize("command, option, value", BAD_VALUES)
def test_a_bad_option_value_is_one_line_naming_the_option(command, option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, *REQUIRED[command], option, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.splitlines()[-1].startswith(f"migrator {command}: error: argument {option}: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, line", [
    (["--postcopy-after", "x"], "argument --postcopy-after: expected a number of rounds (at least 1) or auto, not 'x'"),
    (["--postcopy-after", "0"], "argument --postcopy-after: expected a number of rounds (at least 1) or auto, not '0'"),
    (["--postcopy", "--postcopy-after", "2"], "argument --postcopy-after: not allowed with argument --postcopy"),
    (["--postcopy", "--verify", "full", "--insecure"], "--verify full compares frozen regions"),
])
def test_bad_postcopy_options_are_one_line_before_anything_runs(args, line, tmp_path):
    result = migrator("migrate", "--guest", f"{tmp_path}/none.sock", "--to", "127.0.0.1:9", *args)
    assert result.returncode == 2, result.stderr
    assert line in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr   # after argparse's usage
