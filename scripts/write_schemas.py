#!/usr/bin/env python3
"""Write docs/schemas/<name>.v<version>.json, the JSON Schema of every document kind, from the
dataclasses (``migrator.core.documents.json_schema``). tests/test_documents.py fails
when a file here is stale: run this after changing a report's fields."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from migrator.cli.render import report_types
from migrator.core.documents import VERSION, json_schema
from migrator.source.progress import Progress

OUT = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def schema_text(cls: type) -> str:
    return json.dumps(json_schema(cls), indent=1) + "\n"


def schema_path(name: str) -> Path:
    return OUT / f"{name}.v{VERSION}.json"


def documents() -> dict[str, type]:
    """Every kind of JSON document migrator writes: the reports, and ``--progress-json`` lines."""
    return {**report_types(), Progress.SCHEMA: Progress}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, cls in documents().items():
        schema_path(name).write_text(schema_text(cls))
        print(schema_path(name), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
