"""The command line's error reporting: one line and exit status 1, even from inside a nursery."""

from __future__ import annotations

import subprocess
import sys


def migrator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True, timeout=60)


def test_receive_refusing_to_listen_publicly_says_so_in_one_line():
    result = migrator("receive", "--listen", "0.0.0.0:0", "--insecure")   # serve raises inside receive's nursery
    assert result.returncode == 1
    assert result.stderr.startswith("migrator: TransportError: refusing to listen on 0.0.0.0:0 without a token")
    assert result.stderr.count("\n") == 1, result.stderr
