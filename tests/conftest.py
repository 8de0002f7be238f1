import os
import tempfile

import pytest


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
