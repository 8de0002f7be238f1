import os
import tempfile

import pytest


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path_factory, monkeypatch):
    """Each test's own XDG_RUNTIME_DIR, inherited by the receivers and sources it starts: their
    default token file (``migrator.core.tokens``) is the test's, never the user's."""
    runtime = tmp_path_factory.mktemp("runtime")
    runtime.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime


@pytest.fixture
def sockdir():
    """A short directory for unix sockets (sun_path is limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="mig-", dir="/tmp") as d:
        yield d


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="fault tests need root (network namespaces, tc)")
        for item in items:
            if "faults" in item.keywords:
                item.add_marker(skip)
