"""Read and render the reports engines write: round table, summary, live line, plot.

A report is the JSON of one of the engines' report dataclasses, named by its ``schema``:
``migrator.migration`` (``source.report.MigrationReport``), ``migrator.checkpoint``
(``checkpoint.engine.CheckpointReport``), ``migrator.receive`` (``destination.report.ReceiveReport``),
``migrator.restore`` (``checkpoint.restore.RestoreReport``); ``docs/schemas/`` has each one's
JSON Schema. A file is read back through its dataclass's ``from_dict``, so every field is
type-checked and a bad one is one line naming it. A failed run may leave the optional totals
null. One column list (``COLUMNS``) drives the round table (``cli.progress`` renders a running
migration). matplotlib is imported only to plot (``migrator[plot]``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.documents import convert
from ..core.errors import MigratorError, OutputError
from ..core.files import check_output, open_output, write_json
from ..source.report import MigrationReport, RoundStats

MiB = 1 << 20
ROUND_KINDS = ("migration", "checkpoint")    # reports with pre-copy rounds: a table, a plot


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


def report_types() -> dict[str, type]:
    """Schema name -> the dataclass of that kind of report."""
    from ..checkpoint.engine import CheckpointReport
    from ..checkpoint.restore import RestoreReport
    from ..destination.report import ReceiveReport

    return {cls.SCHEMA: cls for cls in (MigrationReport, CheckpointReport, ReceiveReport, RestoreReport)}


def read_report(data: object):
    """Parsed JSON as the report dataclass its ``schema`` names; MigratorError with one line."""
    types = report_types()
    schema = data.get("schema") if isinstance(data, dict) else None
    name = schema.get("name") if isinstance(schema, dict) else None
    if name not in types:
        found = f"its schema is {name!r}" if name is not None else "it has no 'schema' {name, version}"
        raise MigratorError(f"not a migrator report: {found} (reports are {', '.join(types)})")
    return types[name].from_dict(data)


def load_report(path: str | Path):
    """Read and check a report file: the report dataclass; MigratorError naming the file and the
    problem otherwise."""
    try:
        return read_report(json.loads(Path(path).read_text()))
    except OSError as exc:
        raise MigratorError(f"{path}: cannot read the report: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f": {exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise MigratorError(f"{path}: not JSON{where}") from exc
    except MigratorError as exc:
        raise MigratorError(f"{path}: {exc}") from exc


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
    """Raise MigratorError with one line saying what is wrong with ``report`` (parsed JSON)."""
    read_report(report)


def report_rounds(report: dict) -> list[RoundStats]:
    """The rounds of a migration or checkpoint document, type-checked, as RoundStats."""
    return list(convert(tuple[RoundStats, ...], report.get("rounds")))


def _cells(stats: RoundStats) -> list[str]:
    return [c.cell(stats) for c in COLUMNS]


def format_round_table(report: dict) -> str:
    """A fixed-width table with one row per round."""
    rows = [_cells(r) for r in report_rounds(report)]
    widths = [max([len(c.header), c.width] + [len(row[i]) for row in rows]) for i, c in enumerate(COLUMNS)]
    lines = [[c.header for c in COLUMNS], *rows]
    return "\n".join("  ".join(f"{cell:>{w}}" for cell, w in zip(line, widths)) for line in lines)


def summarize(report: dict) -> dict:
    """A migration or checkpoint report's totals as one flat object: what the summary shows."""
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
        "verify": settings.get("verify"),
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


def _downtime_parts(parts: dict) -> str:
    """The source's parts in order, the destination's (``dest_*``, inside ``verify`` and
    ``commit``) after them in parentheses: "freeze 0.6, ..., commit 2.4 (destination: check 0.8)"."""
    own = ", ".join(f"{name} {ms:.1f}" for name, ms in parts.items() if not name.startswith("dest_"))
    dest = ", ".join(f"{name[5:]} {ms:.1f}" for name, ms in parts.items() if name.startswith("dest_"))
    return own + (f" (destination: {dest})" if dest else "")


def format_summary(report: dict) -> str:
    """A few ``label  value`` lines: result, rule, rounds, downtime and its parts, bytes."""
    if (report.get("settings") or {}).get("mode") == "resume":
        return _format_resume_summary(report)
    s = summarize(report)
    parts = _downtime_parts(s["downtime_parts_ms"])
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
    pc = report.get("postcopy")
    if pc:
        rounds = pc["switch_round"]
        lines.insert(2, ("mode", f"{report['settings'].get('mode', 'precopy')}: post-copy after {rounds} pre-copy "
                                 f"round{'s' if rounds != 1 else ''}"))
        lines.append(("postcopy", f"{pc['stale_pages']} stale pages ({pc['discarded_ahead']} dropped before the freeze): "
                                  f"{pc['requested_pages']} requested by {_fmt(pc['faults'])} faults, "
                                  f"{pc['pushed_pages']} pushed ({pc.get('duplicate_pages', 0)} of them sent again "
                                  f"for a fault), in {_fmt(pc['duration_s'], '.2f')} s"))
        lines.append(("faults", f"p50 {_fmt(pc['fault_p50_ms'], '.3f')} ms, p99 {_fmt(pc['fault_p99_ms'], '.3f')} ms, "
                                f"max {_fmt(pc['fault_max_ms'], '.3f')} ms (fault to page installed, at the destination; "
                                f"{'native loops on the urgent link' if pc.get('native_faults') else 'answered as frames'})"))
        lines.append(("guest", f"{_fmt(pc['guest_rate_before'], '.0f')} writes/s before the switch, "
                               f"{_fmt(pc['guest_rate_after'], '.0f')} during post-copy"))
    if s["error"]:
        lines.append(("error", s["error"]))
    return "\n".join(f"{label:<9} {text}" for label, text in lines)


def _format_resume_summary(report: dict) -> str:
    """``migrate --resume``'s report: no rounds and no downtime, the pages the destination lacked."""
    s, pc = summarize(report), report.get("postcopy")
    lines = [
        ("result", f"{s['result']}, {'verified' if s['verified'] else 'NOT verified'} (page digests of the frozen source)"),
        ("mode", f"resume: finished the interrupted post-copy of migration {report['id']} in {_fmt(s['total_s'], '.2f')} s"),
        ("sent", f"{_fmt(s['pages_sent'])} pages, {_fmt(s['bytes_wire'], '.1f', 1 / MiB)} MiB on the wire"),
    ]
    if pc:
        lines.append(("postcopy", f"{pc['stale_pages']} pages lacking there: {pc['requested_pages']} requested, "
                                  f"{pc['pushed_pages']} pushed, in {_fmt(pc['duration_s'], '.2f')} s (its guest "
                                  f"faulted {_fmt(pc['faults'])} times since the switch)"))
    if s["error"]:
        lines.append(("error", s["error"]))
    return "\n".join(f"{label:<9} {text}" for label, text in lines)


def format_receive_summary(report: dict) -> str:
    """A receive or restore report as ``label  value`` lines: result, guest, rounds, parts."""
    parts = ", ".join(f"{name} {ms:.1f}" for name, ms in report["parts_ms"].items())
    final = sum(1 for r in report["rounds"] if r["final"])
    lines = [
        ("result", f"{report['result']} ({report['restore_guest']} restore guest)"),
        ("id", f"{report['id'] or '-'} from {_fmt(report['peer'])}"),
        ("guest", f"pid {_fmt(report['guest_pid'])}, control {_fmt(report['guest_control'])}"),
        ("rounds", f"{len(report['rounds']) - final} pre-copy + {final} final in {report['total_s']:.2f} s"),
        ("applied", f"{report['pages_applied']} pages ({report['pages_placed']} received in place) in "
                    f"{report['apply_s']:.2f} s of worker time"),
        ("parts ms", parts or "-"),
    ]
    if report.get("chain"):
        lines.append(("chain", " <- ".join(report["chain"])))
    pc = report.get("postcopy")
    if pc:
        lines.append(("postcopy", f"{pc['stale_pages']} stale pages: {pc['requested_pages']} requested by {pc['faults']} "
                                  f"faults (p50 {_fmt(pc['fault_p50_ms'], '.3f')} ms, p99 {_fmt(pc['fault_p99_ms'], '.3f')} ms), "
                                  f"{pc['pushed_pages']} pushed, in {_fmt(pc['duration_s'], '.2f')} s"))
    if report["error"]:
        lines.append(("error", report["error"]))
    return "\n".join(f"{label:<9} {text}" for label, text in lines)


def plot_report(report: dict, path: str | Path) -> None:
    """Draw, against time, each round's dirty pages, the bandwidth and the throttle in force, and
    the expected downtime against the target (the final downtime starred) to an image file."""
    image_format = plot_format(path)
    rounds = report_rounds(report)
    if not rounds:
        raise MigratorError("the report has no rounds to plot")
    from matplotlib.figure import Figure

    starts = [0.0]
    for r in rounds:
        starts.append(starts[-1] + r.duration_s)
    widths = [r.duration_s for r in rounds]
    x = starts[:-1]                              # each round spans [start, start + duration)
    ends = starts[1:]
    fig = Figure(figsize=(7, 8), layout="constrained")
    dirty_ax, bw_ax, down_ax = fig.subplots(3, 1, sharex=True)
    fig.suptitle(f"{report['kind']} {report['result']}, rule {report.get('rule') or '-'}")

    dirty = [r.dirty_pages for r in rounds]
    dirty_ax.bar(x, dirty, width=widths, align="edge", color="tab:blue", edgecolor="white")
    for start, width, r in zip(x, widths, rounds):
        dirty_ax.annotate(f"r{r.round}", (start + width / 2, r.dirty_pages), ha="center", va="bottom", fontsize=8)
    dirty_ax.set_ylabel("dirty pages per round")
    _log_if_wide(dirty_ax, dirty)

    bandwidth = [r.bandwidth / 1e6 for r in rounds]
    bw_ax.step(starts, bandwidth + bandwidth[-1:], where="post", color="tab:green", label="bandwidth")
    bw_ax.set_ylabel("bandwidth MB/s")
    bw_ax.set_ylim(0, max(bandwidth) * 1.15 or 1)
    throttle_ax = bw_ax.twinx()
    throttle = [r.throttle * 100 for r in rounds]
    throttle_ax.step(starts, throttle + throttle[-1:], where="post", color="tab:purple", linestyle="--", label="throttle")
    throttle_ax.set_ylabel("throttle %", color="tab:purple")
    throttle_ax.set_ylim(0, 100)
    bw_ax.legend(handles=[*bw_ax.get_lines(), *throttle_ax.get_lines()], loc="best")

    expected = [r.expected_downtime_ms for r in rounds]
    down_ax.plot(ends, expected, marker="o", label="expected downtime (at each round's end)")
    shown = list(expected)
    target = (report.get("settings") or {}).get("downtime_ms")
    if target is not None:
        down_ax.axhline(target, linestyle="--", color="tab:red", label=f"target {target:g} ms")
        shown.append(target)
    final = report.get("downtime_ms")
    if final is not None:
        down_ax.plot([ends[-1]], [final], marker="*", markersize=14, linestyle="", color="tab:orange",
                     label=f"final downtime {final:.1f} ms")
        shown.append(final)
    down_ax.set_ylabel("downtime ms")
    down_ax.set_xlabel("seconds since the first round began")
    down_ax.legend(loc="best")
    _log_if_wide(down_ax, shown)
    with open_output(path) as f:
        fig.savefig(f, format=image_format, dpi=100)


def _log_if_wide(ax, values: list[float]) -> None:
    """Log scale when every value is positive and they span more than a factor of 20."""
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
