"""The command line's error reporting: one line and exit status 1, even from inside a nursery."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from migrator import cli as cli_package


def migrator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True, timeout=60)


def test_receive_refusing_to_listen_publicly_says_so_in_one_line():
    result = migrator("receive", "--listen", "0.0.0.0:0", "--insecure")   # serve raises inside receive's nursery
    assert result.returncode == 1
    assert result.stderr.startswith("migrator: TransportError: refusing to listen on 0.0.0.0:0 without a token")
    assert result.stderr.count("\n") == 1, result.stderr


def test_every_command_runs_trio_through_interrupts_so_sigterm_ends_it_like_ctrl_c():
    """A command calling ``trio.run`` itself would die on SIGTERM instead of cleaning up."""
    cli = pathlib.Path(cli_package.__file__).parent
    offenders = [path.name for path in cli.glob("*.py")
                 if path.name != "interrupts.py" and re.search(r"\btrio\.run\(", path.read_text())]
    assert offenders == []
    assert "interrupts.run(" in (cli / "migrate.py").read_text()
