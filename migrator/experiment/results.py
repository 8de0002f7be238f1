"""One row per migration: the measurement, the model's prediction for the same cell, CSV and JSON.

The CSV has exactly ``COLUMNS`` (documented below and in docs/results.md), one row per cell run;
the JSON holds the same rows plus, per cell, the engine's report (every round's statistics) and
the two model curves. Pure functions over finished reports (no I/O except the writers).

==========================  ======================================================================
column                      meaning
==========================  ======================================================================
sweep, cell, repeat         which sweep, the cell's name, the repetition (0-based)
size_mib, pages             region size (MiB) and pages
pattern, tracker            the guest's write pattern and the migrator's tracker
auto_converge               throttle when not converging (else switch over after max_rounds)
dirty_pct, dirty_rate       configured rate: % of pages per second, page writes per second
                            (empty: the guest writes as fast as it can)
guest_rate                  writes/s the guest reported just before the migration started
guest_rate_during           writes/s it achieved from the start to the freeze (a tracker that
                            blocks its writes, or the throttle, shows here)
bandwidth_cap               link cap in bytes/s (empty: unlimited)
round0_bandwidth            bytes/s round 0 achieved
link_bandwidth              the model's bandwidth, bytes/s: the median rate of the rounds after
                            round 0 (round 0 is slowed by the destination populating fresh
                            memory), or without such rounds the cap (round 0's rate if higher,
                            or if uncapped)
ratio                       r = model dirty rate / (link_bandwidth / page size); the model dirty
                            rate is dirty_rate, or guest_rate for a guest writing without limit
downtime_target_ms          the switch-over target
result, verified, error     "committed" or "failed", digests matched, one-line error
rule, converged             rule that ended pre-copy; converged: by downtime-target or min-pages
                            (with auto-converge, possibly thanks to the throttle: see throttle_max)
rounds, throttle_max        pre-copy rounds (round 0 included); highest auto-converge duty
final_pages, downtime_ms    pages sent while frozen; freeze-to-resume time
pages_sent, sent_over_size  page bytes sent / page size (all rounds + final); that over ``pages``
bytes_wire, total_s         bytes on the wire; wall time of the migration
cpu_s, cpu_s_per_round      the source process's CPU seconds (all threads); per round incl. final
dest_cpu_s                  the receiver process's CPU seconds during the migration
model_rounds, ...           the classic model (V r^i, at most the region, or the hot set; round
                            0's measured duration, then V_i / link_bandwidth per round):
model_converged             rounds, whether it converges within the round limit,
model_final_pages           pages left for stop-and-copy,
model_downtime_ms           their downtime at link_bandwidth plus the engine's fixed part,
model_sent_over_size        pages sent over region pages
pattern_model_rounds, ...   the same model with each round's dirty set as the expected distinct
pattern_model_final_pages   pages the guest's writes hit (repeated writes count once; with its
                            step counter and version table pages: ``guest_dirtied``)
pattern_model_sent_over_size
trace, replay_at_s          a replay cell's trace file, and how far into its loop the guest was
                            when the migration started (seconds)
predict_bandwidth           bytes/s the trace-driven prediction (``migrator predict``'s simulation)
                            assumes: the cap, or link_bandwidth on an uncapped link
predict_rounds, ...         its rounds, whether it converges within the round limit, the pages
predict_converged           left for stop-and-copy and the pages sent over region pages, from the
predict_final_pages         replay's start point, with the engine's stop rule for the target
predict_sent_over_size
==========================  ======================================================================
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import functools

from ..core import files
from ..core.errors import MigratorError
from ..core.files import open_output
from ..guest.layout import TABLE_ENTRIES_PER_PAGE, Geometry
from ..core.model import PAGE_SIZE
from ..source.estimator import switchover_fixed_ms
from ..source.estimator import MIN_FIT_PAGES
from ..source.policy import PolicySettings
from ..trace.file import read_trace
from ..trace.model import Trace
from ..trace.predict import simulate
from . import classic_model as model
from .grid import Cell, Grid

GiB = 1 << 30
CONVERGED_RULES = ("downtime-target", "min-pages")

COLUMNS = (
    "sweep", "cell", "repeat", "size_mib", "pages", "pattern", "tracker", "auto_converge", "dirty_pct", "dirty_rate",
    "guest_rate", "guest_rate_during", "bandwidth_cap", "round0_bandwidth", "link_bandwidth", "ratio", "downtime_target_ms",
    "result", "verified", "error", "rule", "converged", "rounds", "throttle_max", "final_pages",
    "downtime_ms", "pages_sent", "sent_over_size", "bytes_wire", "total_s", "cpu_s", "cpu_s_per_round",
    "dest_cpu_s",
    "model_rounds", "model_converged", "model_final_pages", "model_downtime_ms", "model_sent_over_size",
    "pattern_model_rounds", "pattern_model_final_pages", "pattern_model_sent_over_size",
    "trace", "replay_at_s", "predict_bandwidth", "predict_rounds", "predict_converged", "predict_final_pages",
    "predict_sent_over_size",
)


@dataclass(frozen=True)
class CellResult:
    """What running one cell produced (the engine's report may describe a failed migration)."""

    cell: Cell
    repeat: int
    report: dict
    guest_rate: float                 # writes/s just before the migration
    cpu_s: float
    dest_cpu_s: float | None
    guest_rate_during: float | None   # writes/s from the migration's start to the freeze
    replay_at_s: float | None = None  # a replay: seconds into its loop when the migration started


def fixed_downtime_ms(size: int) -> float:
    """The engine's fixed switch-over cost for a region of ``size`` bytes (its own constants)."""
    return switchover_fixed_ms(size)


@dataclass(frozen=True)
class ModelInputs:
    """What the model is fed for one cell, all measured or configured, none fitted to the rounds'
    dirty sets: round 0's pages and duration, the link's rate, the guest's write rate."""

    volume: float          # pages round 0 sent
    first_round_s: float   # round 0's duration
    bandwidth: float       # pages/s the later rounds moved (median), else the cap or round 0's rate
    dirty_rate: float      # page writes/s: configured, or measured for an unlimited guest


def model_inputs(result: CellResult) -> ModelInputs | None:
    """None when the migration did not finish round 0."""
    rounds = result.report.get("rounds") or []
    if not rounds or not rounds[0]["bandwidth"] > 0:
        return None
    cell = result.cell
    # Round 0 is slowed by the destination populating fresh memory, and a capped link delivers
    # less than its cap (see docs/results.md): the later rounds show what the link really moves.
    later = [r["bandwidth"] for r in rounds[1:] if r["dirty_pages"] - r["zero_pages"] >= MIN_FIT_PAGES]
    if later:
        bandwidth = statistics.median(later)
    else:
        bandwidth = rounds[0]["bandwidth"] if cell.bandwidth is None else max(cell.bandwidth, rounds[0]["bandwidth"])
    bandwidth /= PAGE_SIZE
    rate = cell.dirty_rate if cell.dirty_rate is not None else result.guest_rate
    return ModelInputs(rounds[0]["dirty_pages"], rounds[0]["duration_s"], bandwidth, rate)


def predictions(result: CellResult, grid: Grid, inputs: ModelInputs) -> dict[str, model.Prediction]:
    """The classic model (every write a new page, at most the region or the hot set) and the
    guest-aware one (``guest_dirtied``), with the engine's stop rule for the grid's target."""
    cell = result.cell
    fixed_s = fixed_downtime_ms(cell.size) / 1e3
    cap = model.hot_set_pages(cell.pattern, cell.pages) or cell.pages
    common = dict(
        stop_at=model.stop_pages(grid.downtime_ms / 1e3, inputs.bandwidth, fixed_s),
        max_rounds=grid.max_rounds, first_round_s=inputs.first_round_s,
    )
    args = (inputs.volume, inputs.dirty_rate, inputs.bandwidth)
    both = {"classic": model.predict(*args, dirtied=lambda writes: min(writes, cap), **common)}
    if cell.trace is None:   # a replay's own model is the trace's (``trace_prediction``)
        both["pattern"] = model.predict(*args, dirtied=guest_dirtied(cell), **common)
    return both


@functools.lru_cache(maxsize=16)
def _trace(path: str) -> Trace | None:
    """A replay cell's trace, read once (None if it is gone or unreadable: no prediction)."""
    try:
        return read_trace(path)
    except MigratorError:
        return None


def trace_prediction(result: CellResult, grid: Grid, inputs: ModelInputs | None) -> tuple[float, model.Prediction] | None:
    """(bandwidth in pages/s, the trace-driven prediction) for a replay cell: ``migrator predict``'s
    simulation of the same trace at the cell's cap (or the measured link without one), the
    guest's region as round 0, starting where the replay was, ended by the engine's own rules
    for the grid's downtime target and round limit. None for other cells, or without a
    bandwidth or the trace."""
    cell = result.cell
    trace = _trace(cell.trace) if cell.trace is not None else None
    if trace is None:
        return None
    if cell.bandwidth is not None:
        bandwidth = cell.bandwidth / PAGE_SIZE
    elif inputs is not None:
        bandwidth = inputs.bandwidth
    else:
        return None
    fixed_ms = fixed_downtime_ms(cell.size)
    stop_at = model.stop_pages(grid.downtime_ms / 1e3, bandwidth, fixed_ms / 1e3)
    policy = PolicySettings(downtime_ms=grid.downtime_ms, force_switchover=not cell.auto_converge, settle=False)
    return bandwidth, simulate(trace, bandwidth, stop_at=stop_at, max_rounds=grid.max_rounds, volume=cell.pages,
                               start=result.replay_at_s or 0.0, policy=policy, fixed_ms=fixed_ms)


def guest_dirtied(cell: Cell):
    """Expected distinct pages ``writes`` guest steps dirty: data pages as the pattern spreads them
    (``model.dirty_pages``), plus the guest's bookkeeping (docs/guest-protocol.md): every step
    also stores the step counter (page 0) and a version-table entry (512 per table page, in data
    page order, so sequential writes move through the table and scattered ones hit it anywhere)."""
    geometry = Geometry.for_size(cell.size)
    table = geometry.table_pages
    sequential = cell.pattern == "sequential"

    def dirtied(writes: float) -> float:
        data = model.dirty_pages(writes, geometry.data_pages, cell.pattern)
        if sequential:
            tables = min(table, writes / TABLE_ENTRIES_PER_PAGE + 1)
        else:
            tables = model.distinct_pages(writes, table)
        return data + tables + min(1.0, writes)

    return dirtied


def row(result: CellResult, grid: Grid) -> dict:
    """The CSV row of one cell run (see the module docstring for the columns)."""
    cell, report = result.cell, result.report
    rounds = report.get("rounds") or []
    final = report.get("final_pages")
    pages_sent = sum(r["bytes_raw"] for r in rounds) // PAGE_SIZE + (final or 0)
    inputs = model_inputs(result)
    out = {
        "sweep": cell.sweep, "cell": cell.name, "repeat": result.repeat,
        "size_mib": cell.size / (1 << 20), "pages": cell.pages, "pattern": cell.pattern, "tracker": cell.tracker,
        "auto_converge": cell.auto_converge, "dirty_pct": cell.dirty_pct,
        "dirty_rate": None if cell.dirty_rate is None else round(cell.dirty_rate, 1), "guest_rate": result.guest_rate,
        "guest_rate_during": result.guest_rate_during, "bandwidth_cap": cell.bandwidth,
        "round0_bandwidth": round(rounds[0]["bandwidth"]) if rounds else None,
        "link_bandwidth": None if inputs is None else round(inputs.bandwidth * PAGE_SIZE),
        "ratio": None if inputs is None else model.ratio(inputs.dirty_rate, inputs.bandwidth),
        "downtime_target_ms": grid.downtime_ms,
        "result": report.get("result"), "verified": report.get("verified"), "error": report.get("error"),
        "rule": report.get("rule") or None,
        "converged": report.get("rule") in CONVERGED_RULES and report.get("result") == "committed",
        "rounds": len(rounds), "throttle_max": report.get("throttle_max"), "final_pages": final,
        "downtime_ms": report.get("downtime_ms"), "pages_sent": pages_sent,
        "sent_over_size": pages_sent / cell.pages, "bytes_wire": report.get("bytes_wire"),
        "total_s": report.get("total_s"), "cpu_s": result.cpu_s,
        "cpu_s_per_round": result.cpu_s / (len(rounds) + (final is not None) or 1),
        "dest_cpu_s": result.dest_cpu_s,
    }
    out.update(dict.fromkeys(c for c in COLUMNS if c.startswith(("model_", "pattern_model_", "predict_"))))
    out.update(trace=cell.trace, replay_at_s=result.replay_at_s)
    predicted = trace_prediction(result, grid, inputs)
    if predicted is not None:
        bandwidth, prediction = predicted
        out.update(predict_bandwidth=round(bandwidth * PAGE_SIZE), predict_rounds=prediction.rounds,
                   predict_converged=prediction.converged, predict_final_pages=round(prediction.final_pages, 1),
                   predict_sent_over_size=prediction.total_pages / cell.pages)
    if inputs is not None:
        fixed_s = fixed_downtime_ms(cell.size) / 1e3
        both = predictions(result, grid, inputs)
        for prefix, name in (("model_", "classic"), ("pattern_model_", "pattern")):
            prediction = both.get(name)
            if prediction is None:
                continue
            values = {
                "rounds": prediction.rounds,
                "converged": prediction.converged,
                "final_pages": round(prediction.final_pages, 1),
                "downtime_ms": round(prediction.downtime_s(inputs.bandwidth, fixed_s) * 1e3, 3),
                "sent_over_size": prediction.total_pages / cell.pages,
            }
            out.update({prefix + k: v for k, v in values.items() if prefix + k in COLUMNS})
    return {column: out[column] for column in COLUMNS}


def cell_record(result: CellResult, grid: Grid) -> dict:
    """The JSON record of one cell run: its row, the engine's report and both model curves."""
    record = {"row": row(result, grid), "report": result.report, "model": None}
    inputs = model_inputs(result)
    if inputs is not None:
        record["model"] = {
            name: {"pages": list(p.pages), "final_pages": p.final_pages, "converged": p.converged}
            for name, p in predictions(result, grid, inputs).items()
        } | {"inputs": asdict(inputs)}
    predicted = trace_prediction(result, grid, inputs)
    if predicted is not None:
        record["predict"] = {"bandwidth": predicted[0] * PAGE_SIZE, "pages": list(predicted[1].pages),
                             "final_pages": predicted[1].final_pages, "converged": predicted[1].converged}
    return record


def cell_from_row(r: dict) -> Cell:
    return Cell(size=int(r["size_mib"] * (1 << 20)), dirty_pct=r["dirty_pct"], bandwidth=r["bandwidth_cap"],
                pattern=r["pattern"], tracker=r["tracker"], auto_converge=r["auto_converge"], sweep=r["sweep"],
                trace=r.get("trace"))


def recompute(document: dict, grid: Grid) -> None:
    """Rebuild every record's row and model curves from its stored report (after a model change,
    without rerunning the migrations). ``grid`` supplies the shared settings."""
    for i, record in enumerate(document["cells"]):
        r = record["row"]
        result = CellResult(cell_from_row(r), r["repeat"], record["report"], r["guest_rate"], r["cpu_s"],
                            r["dest_cpu_s"], r.get("guest_rate_during"), r.get("replay_at_s"))
        document["cells"][i] = cell_record(result, grid)


def write_csv(rows: list[dict], path: str | Path) -> None:
    with open_output(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(v) for k, v in r.items()})


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return value


def write_json(document: dict, path: str | Path) -> None:
    files.write_json(path, document, indent=1, allow_nan=False)
