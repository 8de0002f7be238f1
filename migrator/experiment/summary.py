"""Markdown tables of an experiment's results (summary.md, and the tables in docs/results.md)."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.files import write_file

MB = 1_000_000


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _table(headers: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in line) + " |" for line in lines]
    return "\n".join(out)


def _cap(cap) -> str:
    return "unlimited" if cap is None else f"{cap / MB:g} MB/s"


def _rate(pct) -> str:
    return "unlimited" if pct is None else f"{pct:g}"


def sweep_table(rows: list[dict]) -> str:
    """One line per cell: measured against the classic model (in parentheses)."""
    lines = []
    for r in rows:
        if r["result"] != "committed":
            lines.append([r["pattern"], _cap(r["bandwidth_cap"]), _rate(r["dirty_pct"]), f"{r['size_mib']:g}",
                          r["tracker"], "-", f"failed: {r['error']}", "-", "-", "-", "-", "-"])
            continue
        lines.append([
            r["pattern"], _cap(r["bandwidth_cap"]), _rate(r["dirty_pct"]), f"{r['size_mib']:g}",
            r["tracker"] + (" +AC" if r["auto_converge"] else ""),
            _fmt(r["ratio"]),
            f"{r['rounds']} ({_fmt(r['model_rounds'])}{'' if r['model_converged'] else '*'}; "
            f"{_fmt(r['pattern_model_rounds'])})",
            r["rule"] + (f" thr {r['throttle_max']:.0%}" if r["throttle_max"] else ""),
            f"{r['downtime_ms']:.1f} ({_fmt(r['model_downtime_ms'], '.1f')})",
            f"{r['sent_over_size']:.2f} ({_fmt(r['model_sent_over_size'], '.2f')}; "
            f"{_fmt(r['pattern_model_sent_over_size'], '.2f')})",
            f"{r['cpu_s_per_round'] * 1e3:.1f}",
            f"{r['total_s']:.2f}",
        ])
    headers = ["pattern", "cap", "%/s", "MiB", "tracker", "r", "rounds (classic; guest model)", "rule",
               "downtime ms (model)", "sent/size (classic; guest model)", "CPU ms/round", "total s"]
    return _table(headers, lines)


def replay_table(rows: list[dict]) -> str:
    """One line per replay cell: measured against ``migrator predict``'s simulation of its trace."""
    lines = []
    for r in rows:
        name = os.path.basename(r["trace"] or "?")
        if r["result"] != "committed":
            lines.append([name, _cap(r["bandwidth_cap"]), r["tracker"], f"failed: {r['error']}", "-", "-", "-", "-", "-"])
            continue
        predicted = r["predict_rounds"] is not None
        lines.append([
            name, _cap(r["bandwidth_cap"]), r["tracker"] + (" +AC" if r["auto_converge"] else ""),
            f"{r['rounds']} ({_fmt(r['predict_rounds'])}{'' if r['predict_converged'] or not predicted else '*'})",
            f"{r['pages_sent']} ({_fmt(r['predict_sent_over_size'] * r['pages'] if predicted else None, '.0f')})",
            f"{r['final_pages']} ({_fmt(r['predict_final_pages'], '.0f')})",
            r["rule"], f"{r['downtime_ms']:.1f}", f"{r['total_s']:.2f}",
        ])
    headers = ["trace", "cap", "tracker", "rounds (predicted)", "pages sent (predicted)",
               "final pages (predicted)", "rule", "downtime ms", "total s"]
    return _table(headers, lines)


def slowdown_markdown(table: list[dict]) -> str:
    lines = [[t["tracker"], t["windows"], f"{t['steps_per_s']:,.0f}",
              f"{t['steps_per_s_min']:,.0f}-{t['steps_per_s_max']:,.0f}",
              _fmt(t["relative"], ".2f"), _fmt(t["slowdown_pct"], ".1f"), f"{t['cpu_share'] * 100:.1f}",
              _fmt(t["pages_per_collect"], ".0f")] for t in table]
    headers = ["tracker", "windows", "guest writes/s (median)", "range", "vs untracked", "slowdown %",
               "migrator CPU %", "pages per collect"]
    return _table(headers, lines)


def trackers_markdown(table: list[dict]) -> str:
    lines = [[m["tracker"], m["pattern"], _rate(m["dirty_pct"]), _cap(m["bandwidth_cap"]), m["runs"],
              _fmt(m["guest_rate_during"], ",.0f"), _fmt(m["rounds"]), f"{m['cpu_s_per_round'] * 1e3:.1f}", f"{m['cpu_s']:.2f}",
              f"{m['sent_over_size']:.2f}", f"{m['bytes_wire'] / (1 << 20):.0f}", f"{m['downtime_ms']:.1f}",
              f"{m['total_s']:.2f}", ", ".join(m["rules"])] for m in table]
    headers = ["tracker", "pattern", "%/s", "cap", "runs", "guest writes/s", "rounds", "CPU ms/round", "CPU s", "sent/size",
               "MiB wire", "downtime ms", "total s", "rule"]
    return _table(headers, lines)


def summary_markdown(document: dict) -> str:
    rows = [c["row"] for c in document["cells"]]
    grid, machine = document["grid"], document["machine"]
    parts = [
        f"# Experiment {grid['name']}: {len(rows)} migrations in {document.get('duration_s', 0):.0f} s",
        "",
        f"`{document['command']}` on {document['started']}, Linux {machine['kernel']}, {machine['cpus']} CPUs, "
        f"load average at start {machine['loadavg_start'][0]:.2f}"
        + (f", at end {machine['loadavg_end'][0]:.2f}" if "loadavg_end" in machine else "") + ". "
        f"Every migration: downtime target {grid['downtime_ms']:g} ms, {grid['max_rounds']} rounds before "
        f"auto-converge, compression {grid['compress']}, {grid['fill']} pages.",
        "",
        "Measured value, then in parentheses the classic model and the guest-aware model (repeated writes "
        "count once; * = the classic model does not converge within the round limit). +AC: auto-converge (throttle) instead of a forced "
        "switch-over after the round limit.",
    ]
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        chosen = [r for r in rows if r["sweep"] == sweep]
        if sweep == "replay":
            parts += ["", "## Sweep: replay", "",
                      "Guests replaying traces (`guest --replay`); in parentheses what `migrator predict`'s "
                      "simulation of the same trace says at the cap (the measured link when uncapped), from "
                      "where the replay was when the migration started (* = it does not converge within "
                      "the round limit).", "", replay_table(chosen)]
        else:
            parts += ["", f"## Sweep: {sweep}", "", sweep_table(chosen)]
    slowdown = (document.get("slowdown") or {}).get("table")
    if slowdown:
        s = document["slowdown"]["settings"]
        parts += ["", "## Tracker comparison: guest slowdown", "",
                  f"A {s['size'] >> 20} MiB {s['pattern']} guest writing without limit; {s['window_s']:g} s "
                  f"windows, the tracker collecting every {s['interval_s'] * 1e3:g} ms, trackers alternating, "
                  f"{s['repeats']} windows each.", "", slowdown_markdown(slowdown)]
    if document.get("trackers"):
        parts += ["", "## Tracker comparison: migrations (medians)", "", trackers_markdown(document["trackers"])]
    return "\n".join(parts) + "\n"


def write_summary(document: dict, path: str | Path) -> None:
    """``summary_markdown(document)`` into ``path`` (replaced atomically, never through a link)."""
    write_file(path, summary_markdown(document))
