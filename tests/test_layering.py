"""House rule 1: the codec and the kernel layer are synchronous; only the upper layers use trio.

Each check imports every module of a package in a fresh interpreter (so nothing else has
imported trio already) and looks at ``sys.modules``.
"""

import json
import subprocess
import sys

import pytest

PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in ("trio", "socket", "threading", "asyncio") if m in sys.modules)))
"""


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
