"""The experiment harness: the quick grid end to end (real guests, real migrations), the grids,
and the command line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from migrator.cli.main import build_parser
from migrator.core.errors import MigratorError
from migrator.experiment import grid as g
from migrator.cli.experiment import build_grid
from migrator.experiment.results import COLUMNS
from migrator.tracker.features import wp_async_missing

MiB = 1 << 20


def _experiment(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrator", "experiment", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick grid's output directory, run once for the tests that read it."""
    if wp_async_missing() is not None:
        pytest.skip(f"userfaultfd WP_ASYNC: {wp_async_missing()}")
    out = tmp_path_factory.mktemp("experiment") / "quick"
    done = _experiment("--quick", "--out", str(out), timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_quick_grid_runs_real_migrations_and_writes_one_row_per_cell(quick):
    out = quick
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == list(COLUMNS)
    assert [r["cell"] for r in rows] == [cell.name for _, cell in g.quick_grid().runs()]
    for r in rows:
        assert r["result"] == "committed" and r["verified"] == "True", r
        assert int(r["rounds"]) >= 1 and float(r["downtime_ms"]) > 0 and float(r["sent_over_size"]) >= 1
        assert r["ratio"] and r["model_rounds"] and r["pattern_model_rounds"], "the model ran for every cell"

    document = json.loads((out / "results.json").read_text())
    assert len(document["cells"]) == len(rows)
    for record, r in zip(document["cells"], rows):
        rounds = record["report"]["rounds"]
        assert len(rounds) == int(r["rounds"]) and rounds[0]["dirty_pages"] > 0
        assert record["model"]["classic"]["pages"][0] == rounds[0]["dirty_pages"]
    assert {t["tracker"] for t in document["slowdown"]["table"]} == {"untracked", "wp-async", "sync-wp", "full"}
    assert {m["tracker"] for m in document["trackers"]} == {"wp-async", "sync-wp", "full"}
    assert "## Tracker comparison: guest slowdown" in (out / "summary.md").read_text()
    for name in ("sweep.png", "rounds.png", "trackers.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # plots and tables are redrawn from the JSON alone
    (out / "sweep.png").unlink()
    done = _experiment("--replot", "--out", str(out), timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "sweep.png").stat().st_size > 0


def _tick_labels(axis) -> list[str]:
    """The non-empty labels of ``axis``'s major ticks inside its view (a drawn figure)."""
    low, high = sorted(axis.get_view_interval())
    return [tick.label1.get_text() for tick in axis.get_major_ticks()
            if low <= tick.get_loc() <= high and tick.label1.get_visible() and tick.label1.get_text().strip()]


def test_every_experiment_plot_axis_has_two_tick_labels_and_a_label(quick):
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install migrator[plot])")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from migrator.experiment import plots

    document = json.loads((quick / "results.json").read_text())
    sweep = plots.main_sweep(document)
    figures = {
        "sweep": plots.sweep_figure(document, sweep),
        "rounds": plots.rounds_figure(document, plots.choose_cells(document, sweep)),
        "trackers": plots.trackers_figure(document),
    }
    if plots.sweep_cells(document, "throttle"):
        figures["throttle"] = plots.rounds_figure(document, plots.sweep_cells(document, "throttle"))
    checked = 0
    for name, fig in figures.items():
        FigureCanvasAgg(fig).draw()
        for i, ax in enumerate(a for a in fig.axes if a.get_visible()):
            for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
                where = f"{name} plot, axes {i} ({ax.get_title()!r}), {which} axis ({axis.get_scale()})"
                labels = _tick_labels(axis)
                assert len(set(labels)) >= 2, f"{where}: tick labels {labels}"
                assert len(set(labels)) == len(labels), f"{where}: repeated tick labels {labels}"
                assert axis.get_label_text().strip(), f"{where}: no axis label"
                checked += 1
    assert checked >= 2 * (len(plots.SWEEP_METRICS) + 2), "a sweep column and the two tracker panels at least"
    trackers = figures["trackers"].axes[1]
    assert all(m["tracker"] in label for m, label in zip(document["trackers"], _tick_labels(trackers.xaxis)))


def test_cells_convert_percent_to_page_writes():
    cell = g.Cell(size=64 * MiB, dirty_pct=1.0, bandwidth=None)
    assert cell.pages == 16384 and cell.dirty_rate == pytest.approx(163.84)
    assert g.Cell(size=64 * MiB, dirty_pct=None, bandwidth=50e6).dirty_rate is None
    assert cell.name == "64MiB uniform 1%/s unlimited wp-async"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dirty_pct": 0}, "must be > 0"),
        ({"bandwidth": -1}, "bytes/s or None"),
        ({"tracker": "psychic"}, "choose one of"),
        ({"pattern": "hot:2:0.5"}, "0 < FRACTION < 1"),
        ({"size": 1000}, "multiple of 4096"),
    ],
)
def test_bad_cells_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(MigratorError, match=message):
        g.Cell(**({"size": MiB, "dirty_pct": 1.0, "bandwidth": None} | kwargs))


def test_presets_cover_the_sweeps_within_their_limits():
    default = g.default_grid()
    assert {c.sweep for c in default.cells} == {"rate", "tracker", "size", "throttle"}
    assert {c.tracker for c in default.cells} == {"wp-async", "sync-wp", "full"}
    assert {c.pattern for c in default.cells} == {"uniform", g.HOT, "sequential"}
    quick = g.quick_grid()
    assert all(c.size <= 32 * MiB for c in quick.cells) and len(quick.runs()) <= 10


def _grid(argv: list[str]) -> g.Grid:
    return build_grid(build_parser("experiment").parse_args(["experiment", *argv]))


def test_command_line_lists_make_one_product_sweep():
    grid = _grid(["--rates", "1,unlimited", "--bandwidths", "50M,500mbit,unlimited", "--patterns", "sequential",
                  "--max-rounds", "4"])
    assert grid.name == "custom" and grid.max_rounds == 4 and len(grid.cells) == 6
    assert {c.bandwidth for c in grid.cells} == {50e6, 62.5e6, None}
    assert {c.dirty_pct for c in grid.cells} == {1.0, None}
    assert {(c.size, c.pattern, c.tracker) for c in grid.cells} == {(64 * MiB, "sequential", "wp-async")}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rates", "1,zero"], "argument --rates: bad value 'zero'"),
        (["--bandwidths", "fast"], "argument --bandwidths: bad value 'fast'"),
        (["--trackers", "wp-async,psychic"], "argument --trackers: bad value 'psychic'"),
        (["--downtime-ms", "-3"], "expected a positive number"),
    ],
)
def test_bad_command_lines_say_what_was_wrong(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _grid(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def _sweep_trace_file(tmp_path):
    from harness.traces import sweep_trace
    from migrator.trace.file import write_trace

    path = tmp_path / "sweep.trace"
    write_trace(path, sweep_trace(pages=(2048, 1024), hot=128, sweep=256, intervals=10, seconds=0.1))
    return path


def test_traces_make_a_replay_sweep_sized_by_each_trace(tmp_path):
    path = _sweep_trace_file(tmp_path)
    grid = _grid(["--traces", f"{path},{path}", "--bandwidths", "50M,100M"])
    assert [c.sweep for c in grid.cells] == ["replay"] * 4
    assert {(c.pattern, c.dirty_pct, c.trace) for c in grid.cells} == {("replay", None, str(path))}
    assert all(c.size > 3072 * 4096 and c.name.startswith(f"{c.size / MiB:.3g}MiB replay:sweep.trace")
               for c in grid.cells)
    mixed = _grid(["--traces", str(path), "--patterns", "uniform"])   # and a synthetic sweep beside it
    assert [c.sweep for c in mixed.cells] == ["replay", "custom"]


def test_a_bad_trace_is_one_line(tmp_path):
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"not a trace")
    done = _experiment("--traces", str(bad), "--out", str(tmp_path / "out"), timeout=60)
    assert done.returncode != 0 and "bad.trace: not a migrator trace" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.skipif(wp_async_missing() is not None, reason=f"userfaultfd WP_ASYNC: {wp_async_missing()}")
def test_replay_cells_migrate_and_sit_next_to_the_prediction(tmp_path):
    path = _sweep_trace_file(tmp_path)
    out = tmp_path / "replay"
    done = _experiment("--traces", str(path), "--bandwidths", "50M,unlimited", "--no-compare", "--no-plots",
                       "--out", str(out), timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for r in rows:
        assert r["result"] == "committed" and r["verified"] == "True", r
        assert r["pattern"] == "replay" and r["trace"] == str(path) and r["replay_at_s"] != ""
        assert int(r["predict_rounds"]) >= 1 and float(r["predict_sent_over_size"]) >= 1, "predict ran"
    assert rows[0]["predict_bandwidth"] == "50000000"
    summary = (out / "summary.md").read_text()
    assert "## Sweep: replay" in summary and "| sweep.trace | 50 MB/s |" in summary
    document = json.loads((out / "results.json").read_text())
    assert all(record["predict"]["pages"][0] == int(rows[0]["pages"]) for record in document["cells"])
    # recomputed from the JSON alone, the predictions stay (the trace is read again)
    done = _experiment("--replot", "--no-plots", "--out", str(out), timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert [c["predict"] for c in again["cells"]] == [c["predict"] for c in document["cells"]]
