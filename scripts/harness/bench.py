"""What every benchmark script shares: goal entries, their printout, and the --json output.

A goal is ``{"name", "value", "baseline", "target", "met"}`` (plus any extra keys), so anyone can
re-check a claim from the JSON alone.
"""

from __future__ import annotations

import json
import sys


def goal(name: str, value, baseline, target, met: bool, **extra) -> dict:
    return {"name": name, "value": value, "baseline": baseline, "target": target, "met": bool(met), **extra}


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_goals(goals: list[dict], file=sys.stdout) -> None:
    for g in goals:
        print(f"  {'MET ' if g['met'] else 'MISS'} {g['name']}: {_shown(g['value'])} "
              f"(target {_shown(g['target'])}, baseline {_shown(g['baseline'])})", file=file)


def finish(result: dict, goals: list[dict], destination: str | None, file=sys.stdout) -> int:
    """Print the goals, write the JSON, and return the exit status: 0 only if every goal is met."""
    print("\ngoals:", file=file)
    print_goals(goals, file=file)
    emit_json(result, destination)
    return 0 if all(g["met"] for g in goals) else 1


def emit_json(result: dict, destination: str | None) -> None:
    """Write ``result`` to ``destination`` ('-' is stdout; None writes nothing)."""
    if not destination:
        return
    text = json.dumps(result, indent=1, default=str)
    if destination == "-":
        print(text)
    else:
        with open(destination, "w") as f:
            f.write(text + "\n")
