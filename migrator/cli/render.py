"""Read and render the report an engine writes: round table, summary, live line, plot.

A report is a JSON object: ``kind`` ("migration" | "checkpoint"), ``settings`` {downtime_ms,
max_rounds, tracker, compress, streams, bandwidth, verify, size_bytes, pages}, ``rounds`` (every
``RoundStats`` field per round), ``rule``, ``rule_reason``, ``throttle_max``, ``downtime_ms``,
``downtime_parts_ms`` {part: ms}, ``total_s``, ``pages_sent``, ``bytes_raw``, ``bytes_wire``,
``verified``, ``verify``, ``result`` ("committed" | "failed"), ``error``. A failed run may leave
the optional totals null. One column list (``COLUMNS``) drives both the round table and the live
progress line, so they always agree. matplotlib is imported only to plot (``migrator[plot]``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import MigratorError, OutputError
from ..core.files import check_output, open_output, write_json
from ..source.report import RoundStats

KINDS = ("migration", "checkpoint")
RESULTS = ("committed", "failed")
MiB = 1 << 20
_NUMBER = (int, float)
# Optional top-level keys (absent or null is fine) and their types; kind, result, rounds are required.
_TYPES: dict[str, type | tuple[type, ...]] = {
    "settings": dict, "rule": str, "rule_reason": str, "throttle_max": _NUMBER, "downtime_ms": _NUMBER,
    "downtime_parts_ms": dict, "total_s": _NUMBER, "pages_sent": int, "bytes_raw": int,
    "bytes_wire": int, "verified": bool, "verify": str, "error": str,
}
_ROUND_FIELDS = {f.name: f for f in dataclasses.fields(RoundStats)}


@dataclass(frozen=True)
class Column:
    header: str
    width: int
    cell: Callable[[RoundStats], str]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _ratio(raw: int | None, wire: int | None) -> float | None:
    """Compression ratio, raw over wire bytes (None when unknown)."""
    return raw / wire if raw is not None and wire else None


COLUMNS: tuple[Column, ...] = (
    Column("round", 3, lambda r: str(r.round)),
    Column("dirty", 8, lambda r: str(r.dirty_pages)),
    Column("MiB raw", 7, lambda r: f"{r.bytes_raw / MiB:.1f}"),
    Column("MiB wire", 7, lambda r: f"{r.bytes_wire / MiB:.1f}"),
    Column("ratio", 5, lambda r: _fmt(_ratio(r.bytes_raw, r.bytes_wire), ".2f")),
    Column("scan ms", 6, lambda r: _ms(r.scan_s)),
    Column("read ms", 6, lambda r: _ms(r.read_s)),
    Column("comp ms", 6, lambda r: _ms(r.compress_s)),
    Column("send ms", 6, lambda r: _ms(r.send_s)),
    Column("dirty/s", 8, lambda r: f"{r.dirty_rate:.0f}"),
    Column("MB/s", 6, lambda r: f"{r.bandwidth / 1e6:.0f}"),
    Column("exp ms", 7, lambda r: f"{r.expected_downtime_ms:.1f}"),
    Column("thr %", 3, lambda r: f"{r.throttle * 100:.0f}"),
)


def load_report(path: str | Path) -> dict:
    """Read and check a report file; MigratorError naming the file and the problem otherwise."""
    try:
        report = json.loads(Path(path).read_text())
        check_report(report)
    except OSError as exc:
        raise MigratorError(f"{path}: cannot read the report: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise MigratorError(f"{path}: not JSON: {exc.msg} at line {exc.lineno}") from exc
    except MigratorError as exc:
        raise MigratorError(f"{path}: {exc}") from exc
    return report


def save_report(report: dict | list[dict], path: str | Path) -> None:
    """Write ``report`` as JSON atomically (a reader never sees half a file), never through a link."""
    write_json(path, report, indent=1)


def check_outputs(*, report: str | None = None, plot: str | None = None) -> None:
    """Refuse, before anything runs, the ``--report``/``--plot`` paths a command could not write
    after it: a link, a missing or read-only directory, both options naming one file, a plot
    without matplotlib or in a format it cannot write. MigratorError with one line."""
    for path in (report, plot):
        if path is not None:
            check_output(path)
    if plot is not None:
        if report is not None and os.path.abspath(report) == os.path.abspath(plot):
            raise OutputError(f"--report and --plot both name {plot}")
        plot_format(plot)


def plot_format(path: str | Path) -> str:
    """The image format matplotlib writes ``path`` in: its suffix (PNG without one). MigratorError
    when matplotlib is missing or cannot write that format."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise MigratorError("plotting needs matplotlib: pip install migrator[plot]") from exc
    suffix = os.path.splitext(os.fspath(path))[1][1:].lower()
    if not suffix:
        return "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise OutputError(f"{path}: matplotlib cannot draw .{suffix} files (it draws {', '.join(sorted(formats))})")
    return suffix


def check_report(report: object) -> None:
    """Raise MigratorError with one line saying what is wrong with ``report``."""
    if not isinstance(report, dict):
        raise MigratorError("a report is a JSON object")
    if report.get("kind") not in KINDS:
        raise MigratorError(f"'kind' must be one of {', '.join(KINDS)}, got {report.get('kind')!r}")
    if report.get("result") not in RESULTS:
        raise MigratorError(f"'result' must be one of {', '.join(RESULTS)}, got {report.get('result')!r}")
    if not isinstance(report.get("rounds"), list):
        raise MigratorError("'rounds' must be a list")
    for key, kind in _TYPES.items():
        value = report.get(key)
        if value is not None and not _is(value, kind):
            raise MigratorError(f"{key!r} has the wrong type ({type(value).__name__})")
    if not all(_is(v, _NUMBER) for v in (report.get("downtime_parts_ms") or {}).values()):
        raise MigratorError("'downtime_parts_ms' values must be numbers")
    report_rounds(report)


def _is(value: object, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def report_rounds(report: dict) -> list[RoundStats]:
    """The report's rounds as RoundStats (extra keys ignored, missing or non-numeric ones refused)."""
    out = []
    for i, row in enumerate(report["rounds"]):
        if not isinstance(row, dict):
            raise MigratorError(f"round {i} is not an object")
        values = {}
        for name, field in _ROUND_FIELDS.items():
            if name not in row and field.default is dataclasses.MISSING:
                raise MigratorError(f"round {i} lacks {name!r}")
            value = row.get(name, field.default)
            if not _is(value, _NUMBER):
                raise MigratorError(f"round {i}: {name!r} must be a number, got {value!r}")
            values[name] = value
        out.append(RoundStats(**values))
    return out


def _cells(stats: RoundStats) -> list[str]:
    return [c.cell(stats) for c in COLUMNS]


def format_round_line(stats: RoundStats) -> str:
    """One self-describing line per round for live progress: ``round   3  dirty    1204 ...``."""
    return "  ".join(f"{c.header} {cell:>{c.width}}" for c, cell in zip(COLUMNS, _cells(stats)))


def format_round_table(report: dict) -> str:
    """A fixed-width table with one row per round."""
    rows = [_cells(r) for r in report_rounds(report)]
    widths = [max([len(c.header), c.width] + [len(row[i]) for row in rows]) for i, c in enumerate(COLUMNS)]
    lines = [[c.header for c in COLUMNS], *rows]
    return "\n".join("  ".join(f"{cell:>{w}}" for cell, w in zip(line, widths)) for line in lines)


def summarize(report: dict) -> dict:
    """The report's totals as one flat object (``migrator report --json`` prints it)."""
    settings = report.get("settings") or {}
    return {
        "kind": report["kind"],
        "result": report["result"],
        "error": report.get("error"),
        "rule": report.get("rule"),
        "rule_reason": report.get("rule_reason"),
        "rounds": len(report["rounds"]),
        "total_s": report.get("total_s"),
        "downtime_ms": report.get("downtime_ms"),
        "downtime_target_ms": settings.get("downtime_ms"),
        "downtime_parts_ms": report.get("downtime_parts_ms") or {},
        "throttle_max": report.get("throttle_max"),
        "verified": bool(report.get("verified")),
        "verify": report.get("verify") or settings.get("verify"),
        "pages_sent": report.get("pages_sent"),
        "bytes_raw": report.get("bytes_raw"),
        "bytes_wire": report.get("bytes_wire"),
        "ratio": _ratio(report.get("bytes_raw"), report.get("bytes_wire")),
    }


def _fmt(value, spec: str = "", scale: float = 1) -> str:
    """``value`` (times ``scale``) in ``spec``, or "-" for a missing value."""
    if value is None:
        return "-"
    return format(value * scale if scale != 1 else value, spec)


def format_summary(report: dict) -> str:
    """A few ``label  value`` lines: result, rule, rounds, downtime and its parts, bytes."""
    s = summarize(report)
    parts = ", ".join(f"{name} {ms:.1f}" for name, ms in s["downtime_parts_ms"].items())
    lines = [
        ("result", f"{s['result']}, {'verified' if s['verified'] else 'NOT verified'} (verify={_fmt(s['verify'])})"),
        ("rule", f"{_fmt(s['rule'])}: {_fmt(s['rule_reason'])}"),
        ("rounds", f"{s['rounds']} in {_fmt(s['total_s'], '.2f')} s, "
                   f"throttle up to {_fmt(s['throttle_max'], '.0f', 100)} %"),
        ("downtime", f"{_fmt(s['downtime_ms'], '.1f')} ms (target {_fmt(s['downtime_target_ms'], 'g')} ms)"
                     + (f": {parts}" if parts else "")),
        ("sent", f"{_fmt(s['pages_sent'])} pages, {_fmt(s['bytes_raw'], '.1f', 1 / MiB)} MiB raw, "
                 f"{_fmt(s['bytes_wire'], '.1f', 1 / MiB)} MiB on the wire (ratio {_fmt(s['ratio'], '.2f')})"),
    ]
    if s["error"]:
        lines.append(("error", s["error"]))
    return "\n".join(f"{label:<9} {text}" for label, text in lines)


def plot_report(report: dict, path: str | Path) -> None:
    """Draw dirty pages, bandwidth and expected vs target downtime per round to an image file."""
    rounds = report_rounds(report)
    if not rounds:
        raise MigratorError("the report has no rounds to plot")
    image_format = plot_format(path)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x = [r.round for r in rounds]
    fig = Figure(figsize=(7, 8), layout="constrained")
    dirty_ax, bw_ax, down_ax = fig.subplots(3, 1, sharex=True)
    fig.suptitle(f"{report['kind']} {report['result']}, rule {report.get('rule') or '-'}")

    dirty = [r.dirty_pages for r in rounds]
    dirty_ax.bar(x, dirty, color="tab:blue")
    dirty_ax.set_ylabel("dirty pages")
    _log_if_wide(dirty_ax, dirty)

    bandwidth = [r.bandwidth / 1e6 for r in rounds]
    bw_ax.plot(x, bandwidth, marker="o", color="tab:green")
    bw_ax.set_ylabel("bandwidth MB/s")
    bw_ax.set_ylim(0, max(bandwidth) * 1.15 or 1)

    expected = [r.expected_downtime_ms for r in rounds]
    down_ax.plot(x, expected, marker="o", label="expected downtime")
    shown = list(expected)
    target = (report.get("settings") or {}).get("downtime_ms")
    if target is not None:
        down_ax.axhline(target, linestyle="--", color="tab:red", label=f"target {target:g} ms")
        shown.append(target)
    final = report.get("downtime_ms")
    if final is not None:
        down_ax.plot([x[-1] + 1], [final], marker="*", markersize=14, linestyle="", color="tab:orange",
                     label=f"final downtime {final:.1f} ms")
        shown.append(final)
    down_ax.set_ylabel("downtime ms")
    down_ax.set_xlabel("round (final downtime at the stop-and-copy)")
    down_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    down_ax.legend(loc="best")
    _log_if_wide(down_ax, shown)
    with open_output(path) as f:
        fig.savefig(f, format=image_format, dpi=100)


def _log_if_wide(ax, values: list[float]) -> None:
    """Log scale when every value is positive and they span more than a factor of 20."""
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
