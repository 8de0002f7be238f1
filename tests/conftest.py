import contextlib
import os
import signal
import warnings
import tempfile
import time

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
    """A short directory for unix sockets (sun_path is limited to 108 bytes). Guests whose control
    socket is in it and that still run afterwards (a resumed restore guest outlives its receiver
    by design) are killed, with a warning naming them, so they do not eat later tests' CPU."""
    with tempfile.TemporaryDirectory(prefix="mig-", dir="/tmp") as d:
        yield d
        deadline = time.monotonic() + GUEST_EXIT_GRACE_S    # a guest told to quit exits after its reply
        while (left := _guests_under(d)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            warnings.warn(f"guests left running under {d}: pids {left}", stacklevel=1)


GUEST_EXIT_GRACE_S = 3.0


@pytest.fixture
def guests(sockdir, request):
    """Factory of guest children that die with the test process and are killed at the end (also
    if stopped); ``size`` defaults to the test module's ``SIZE``."""
    from migrator.guest.spawn import spawn_guest

    started = []

    def start(name: str = "guest", paused: bool = False, **options):
        options.setdefault("size", getattr(request.module, "SIZE", 16 << 20))
        extra = ("--exit-with-parent",) + (("--paused",) if paused else ())
        guest = spawn_guest(os.path.join(sockdir, name + ".sock"), extra_args=extra, **options)
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.kill()


def _guests_under(directory: str) -> list[int]:
    """Processes of ``migrator guest`` whose arguments name a path in ``directory``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue        # exited, its parent has yet to reap it
        except OSError:
            continue
        if b"guest" in args and any(arg.startswith(directory.encode() + b"/") for arg in args):
            found.append(int(entry))
    return found


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="fault tests need root (network namespaces, tc)")
        for item in items:
            if "faults" in item.keywords:
                item.add_marker(skip)
