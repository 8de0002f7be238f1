"""Every report kind, written by real commands (real guests, loopback TCP, image files), read back
against its schema; ``report --json`` prints the same document; the exit status of a committed
migration whose output could not be written."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from migrator.cli.render import read_report
from migrator.core.documents import json_schema
from migrator.guest.spawn import spawn_guest
from migrator.tracker.features import wp_async_missing
from write_schemas import documents

MiB = 1 << 20
SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"
needs_wp_async = pytest.mark.skipif(wp_async_missing() is not None,
                                    reason=f"needs userfaultfd WP_ASYNC: {wp_async_missing()}")


def migrator(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True, timeout=timeout)


class Receiver:
    """``migrator receive [--once]`` in the background; ``address`` once it listens."""

    def __init__(self, *args: str, once: bool = True) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0",
                                         *(["--once"] if once else []), *args], stderr=subprocess.PIPE, text=True)
        self._pending = ""
        line = self.wait_for(r"control socket ([^,\s]+), listening on (\S+)")
        self.control, self.address = line.group(1), line.group(2)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        """The first line from now on matching ``pattern``. Reads the pipe's bytes itself: a
        buffered ``readline`` could take two lines written together and leave the second where
        ``select`` never sees it."""
        deadline = time.monotonic() + timeout
        fd = self.process.stderr.fileno()
        while True:
            while "\n" in self._pending:
                line, self._pending = self._pending.split("\n", 1)
                if match := re.search(pattern, line):
                    return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._pending += chunk.decode(errors="replace")
        raise AssertionError(f"the receiver never printed {pattern!r}")

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def schema_of(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.v1.json").read_text())


def check_document(path: Path, name: str) -> dict:
    """The document at ``path``: of kind ``name``, read back through its dataclass, its keys
    exactly its schema's, and ``migrator report --json`` printing it unchanged."""
    doc = json.loads(path.read_text())
    assert doc["schema"] == {"name": name, "version": 1}
    schema = schema_of(name)
    assert set(doc) == set(schema["properties"]) and set(schema["required"]) <= set(doc)
    assert read_report(doc).to_dict() == doc
    datetime.fromisoformat(doc["started_at"])
    assert doc["migrator_version"] and doc["id"]
    shown = migrator("report", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == doc
    return doc


@pytest.mark.parametrize("name", sorted(documents()))
def test_the_schema_files_in_docs_are_generated_from_the_dataclasses(name):
    generated = json.loads(json.dumps(json_schema(documents()[name])))
    assert schema_of(name) == generated, "stale: run scripts/write_schemas.py"


@needs_wp_async
def test_every_report_kind_from_real_commands(tmp_path, sockdir):
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 * MiB, dirty_rate=1000) as guest:
        receiver = Receiver("--report", str(tmp_path / "dest.json"), "--control-dir", sockdir)
        try:
            run = migrator("migrate", "--guest", guest.control, "--to", receiver.address,
                           "--report", str(tmp_path / "run.json"), "--progress-json")
            assert run.returncode == 0, run.stderr
            resumed = receiver.wait_for(r"resumed guest pid \d+, control (\S+)").group(1)
            assert receiver.wait() == 0
        finally:
            receiver.kill()
    source = check_document(tmp_path / "run.json", "migrator.migration")
    *progress, last = [json.loads(line) for line in run.stdout.splitlines()]
    assert last == source, "--progress-json ends with the report document"
    assert {p["schema"]["name"] for p in progress} == {"migrator.progress"} and progress[-1]["phase"] == "committed"
    assert [p["settled"] for p in progress if p["settled"]] == source["rounds"]
    dest = check_document(tmp_path / "dest.json", "migrator.receive")
    assert source["result"] == "committed" and dest["result"] == "resumed"
    assert dest["id"] == source["id"], "both ends name the migration alike"
    assert source["peer"] == receiver.address and dest["peer"].startswith("127.0.0.1")
    assert len([r for r in dest["rounds"] if not r["final"]]) == len(source["rounds"])

    image = tmp_path / "img"
    taken = migrator("checkpoint", "--guest", resumed, "--dir", str(image), "--report", str(tmp_path / "ckpt.json"))
    assert taken.returncode == 0, taken.stderr
    ckpt = check_document(tmp_path / "ckpt.json", "migrator.checkpoint")
    assert ckpt["result"] == "written" and ckpt["image"] == str(image) and ckpt["peer"] == str(image)

    restored = migrator("restore", "--dir", str(image), "--control-dir", sockdir, "--report", str(tmp_path / "restore.json"))
    assert restored.returncode == 0, restored.stderr
    restore = check_document(tmp_path / "restore.json", "migrator.restore")
    assert restore["result"] == "resumed" and restore["chain"] == [str(image)]
    text = migrator("report", str(tmp_path / "restore.json"))
    assert text.returncode == 0 and text.stdout.startswith("result    resumed"), text.stderr
    from migrator.guest.client import GuestClient
    with GuestClient(restore["guest_control"]) as client:
        client.quit()


@needs_wp_async
def test_a_committed_migration_whose_report_cannot_be_written_exits_0_with_its_summary_and_one_warning(tmp_path, sockdir):
    out = tmp_path / "out"
    out.mkdir()
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=32 * MiB, dirty_rate=1000) as guest:
        receiver = Receiver("--control-dir", sockdir)
        try:
            migrate = subprocess.Popen(
                [sys.executable, "-m", "migrator", "migrate", "--guest", guest.control, "--to", receiver.address,
                 "--bandwidth", "8M", "--report", str(out / "run.json")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            receiver.wait_for("into restore guest pid")      # the check of --report passed long ago
            out.rmdir()
            stdout, stderr = migrate.communicate(timeout=90)
            control = receiver.wait_for(r"resumed guest pid \d+, control (\S+)").group(1)
        finally:
            receiver.kill()
    assert migrate.returncode == 0, stderr
    assert "result    committed" in stdout
    assert re.search(r"^round 0 +\d+ pages", stderr, re.M), "a settled line per round, not a live one, on a pipe"
    assert "\r" not in stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("migrator: warning:")]
    assert warnings == [f"migrator: warning: {out / 'run.json'} not written: {out / 'run.json'}: directory {out} does not exist"]
    from migrator.guest.client import GuestClient
    with GuestClient(control) as client:
        client.quit()


def test_a_bad_report_file_is_bad_input(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"schema": {"name": "migrator.migration", "version": 1}, "kind": "migration"}))
    shown = migrator("report", str(path))
    assert shown.returncode == 2
    assert shown.stderr == f"migrator: MigratorError: {path}: object missing required field migrator_version\n"
    assert shown.stdout == ""
