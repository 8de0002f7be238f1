"""The house rules of the package structure, checked on the code itself.

1. The kernel layer (``tracker``) and the codec (``protocol``) are synchronous: only the upper
   layers use trio. Checked by importing every module of a package in a fresh interpreter (so
   nothing else has imported trio already) and looking at ``sys.modules``.
2. Data flows tracker -> source -> protocol -> transport -> destination: the two ends share only
   protocol and transport (and the shared ground, ``core``), so neither imports the other.
3. The library never imports the command line (``migrator.cli`` is a thin layer over it).
4. ``core`` is the ground: it imports no other package of migrator.
5. No module reaches into another package through a private name (``_module`` or ``_name``).

Rules 2-5 read every module's imports (``ast``), including imports inside functions, which a
look at ``sys.modules`` would miss.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import migrator

PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in ("trio", "socket", "threading", "asyncio") if m in sys.modules)))
"""

ROOT = Path(migrator.__file__).parent


def loaded_by(package: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, package], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize("package", ["migrator.protocol", "migrator.tracker"])
def test_package_never_imports_trio(package):
    assert "trio" not in loaded_by(package)


def test_protocol_is_sans_io():
    assert loaded_by("migrator.protocol").isdisjoint({"trio", "socket", "threading", "asyncio"})


def test_the_probe_can_see_trio():
    assert "trio" in loaded_by("migrator.transport")


# --- the import graph, read from the source ---------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(absolute module, names taken from it) for every import statement in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.extend((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, tuple(alias.name for alias in node.names)))
    return out


def area(module: str) -> str:
    """The package a module belongs to: ``migrator.source.rounds`` -> ``source``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "migrator" else ""


EDGES = [
    (module_name(path), target, names)
    for path in sorted(ROOT.rglob("*.py"))
    for target, names in imports(path)
    if target.split(".")[0] == "migrator"
]


def test_the_graph_is_read():
    assert ("migrator.source.migration", "migrator.source.sink", ("PeerSink",)) in EDGES


def offenders(rule) -> list[str]:
    return sorted({f"{source} imports {target}" for source, target, names in EDGES if rule(source, target, names)})


def test_the_two_ends_share_only_protocol_and_transport():
    ends = {"source", "destination"}
    assert offenders(lambda s, t, _: {area(s), area(t)} == ends) == []


def test_the_library_never_imports_the_command_line():
    entry_point = "migrator.__main__"
    assert offenders(lambda s, t, _: area(t) == "cli" and area(s) != "cli" and s != entry_point) == []


def test_core_imports_no_other_package():
    assert offenders(lambda s, t, _: area(s) == "core" and area(t) not in ("core", "native")) == []


def test_no_private_name_crosses_a_package():
    def private(source, target, names):
        if area(source) == area(target):
            return False
        inside = target.split(".")[1:]
        return any(p.startswith("_") for p in inside) or any(n.startswith("_") for n in names)

    assert offenders(private) == []
