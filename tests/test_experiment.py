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
