"""Predict a pre-copy migration of a traced process (``migrator predict TRACE``).

Simulates the rounds the trace implies at ``--bandwidth`` with the ``--downtime-ms`` target
(``migrator.trace.predict``), and prints them next to the classic model fed the trace's mean
dirty rate: rounds, data sent, downtime, and whether auto-converge would be needed.
"""

from __future__ import annotations

import argparse
import json

from ..trace.file import read_trace
from ..trace.predict import compare
from . import options

MB = 1_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", metavar="TRACE")
    parser.add_argument("--bandwidth", type=options.rate, required=True, metavar="RATE",
                        help="link speed, e.g. 100M (bytes/s) or 1gbit")
    parser.add_argument("--downtime-ms", type=options.positive, required=True, metavar="T", help="downtime target")
    parser.add_argument("--max-rounds", type=options.count, default=30, metavar="N", help="pre-copy rounds at most (default 30)")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")


def _row(prediction, comparison, page_size: int) -> dict:
    return {
        "rounds": prediction.rounds,
        "pages_per_round": [round(p, 1) for p in prediction.pages],
        "sent_pages": round(prediction.total_pages, 1),
        "sent_mb": round(prediction.total_pages * page_size / MB, 3),
        "downtime_ms": round(prediction.downtime_s(comparison.bandwidth) * 1e3, 3),
        "final_pages": round(prediction.final_pages, 1),
        "converged": prediction.converged,
        "auto_converge_needed": not prediction.converged,
    }


def run(args: argparse.Namespace) -> int:
    trace = read_trace(args.trace)
    result = compare(trace, args.bandwidth, downtime_s=args.downtime_ms / 1e3, max_rounds=args.max_rounds)
    rows = {"trace": _row(result.trace, result, trace.page_size), "classic": _row(result.classic, result, trace.page_size)}
    if args.json:
        print(json.dumps({"volume_pages": result.volume, "bandwidth_pages_s": result.bandwidth,
                          "stop_pages": result.stop_at, "dirty_rate": result.dirty_rate, **rows}, indent=1))
        return 0
    print(f"process {trace.pid}: {result.volume} pages tracked, mean dirty rate {result.dirty_rate:.1f} pages/s; "
          f"{args.bandwidth / MB:g} MB/s = {result.bandwidth:.0f} pages/s, switch-over at {result.stop_at:.0f} pages")
    print(f"{'model':<9} {'rounds':>6} {'sent MB':>10} {'downtime ms':>12} {'final pages':>12}  auto-converge")
    for name, row in rows.items():
        print(f"{name:<9} {row['rounds']:>6} {row['sent_mb']:>10.2f} {row['downtime_ms']:>12.2f} "
              f"{row['final_pages']:>12.0f}  {'needed' if row['auto_converge_needed'] else 'not needed'}")
    return 0
