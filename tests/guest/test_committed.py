"""The committed-state file: written atomically, tied to one process, read as hostile input."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from migrator.core.errors import GuestError
from migrator.guest import committed


@pytest.fixture
def control(tmp_path):
    return str(tmp_path / "g.sock")


def write(control: str, data: bytes) -> None:
    with open(committed.state_path(control), "wb") as f:
        f.write(data)


def test_round_trip_names_this_process_only(control):
    record = committed.new_record(os.getpid(), "abc123", "10.0.0.2:7000")
    staged = committed.StagedRecord(control, record)
    assert not os.path.exists(committed.state_path(control)), "nothing is visible before publish"
    staged.publish()
    assert os.listdir(os.path.dirname(control)) == ["g.sock.state"], "no temporary file is left"
    assert committed.read_record(control) == record and record.applies_to(os.getpid())
    doc = json.loads(open(committed.state_path(control)).read())
    assert doc["state"] == "committed" and doc["migration"] == "abc123" and doc["committed_at"].endswith("Z")
    refusal = committed.refusal(control, os.getpid(), "resume")
    assert refusal.startswith(f"refusing to resume guest pid {os.getpid()}: migration abc123 committed it to 10.0.0.2:7000")
    assert committed.state_path(control) in refusal and "\n" not in refusal


def test_a_postcopy_record_keeps_its_layout_and_an_older_one_reads_without(control):
    record = committed.new_record(os.getpid(), "pc", "d:1", switch_round=3, page_size=4096,
                                  regions=((0x7F0000000000, 64 << 20),))
    committed.StagedRecord(control, record).publish()
    again = committed.read_record(control)
    assert again == record and again.postcopy and again.regions == ((0x7F0000000000, 64 << 20),)
    assert "(post-copy)" in again.describe()
    doc = json.loads(record.to_json())
    for name in ("switch_round", "page_size", "regions"):
        del doc[name]
    write(control, json.dumps(doc).encode())
    older = committed.read_record(control)
    assert not older.postcopy and older.regions == () and older.page_size == 0


def test_a_file_left_by_a_process_that_is_gone_does_not_apply(control):
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = committed.CommitRecord("old", "d:1", 1.0, gone.pid, 12345, 1)
    write(control, stale.to_json())
    assert committed.refusal(control, gone.pid, "resume") is None
    other_start = committed.CommitRecord("old", "d:1", 1.0, os.getpid(), 1, 1)   # a recycled pid
    write(control, other_start.to_json())
    assert committed.refusal(control, os.getpid(), "resume") is None
    committed.discard_stale(control)
    assert not os.path.exists(committed.state_path(control))


def test_discard_stale_keeps_a_live_record_unless_its_guest_was_killed(control):
    committed.StagedRecord(control, committed.new_record(os.getpid(), "live", "")).publish()
    committed.discard_stale(control)
    committed.discard_stale(control, killed=os.getpid() + 1)      # another process was killed
    assert committed.read_record(control).migration == "live"
    committed.discard_stale(control, killed=os.getpid())          # its guest: it never runs again
    assert not os.path.exists(committed.state_path(control))


@pytest.mark.parametrize("data, why", [
    (b"\x00\xff" * 10, "malformed"),
    (b"[]", "no 'state'"),
    (b'{"state": "running"}', "no 'state'"),
    (b'{"state": "committed"}', "malformed"),
    (b" " * (committed.MAX_BYTES + 1), "longer than"),
    (b"[" * 100_000, "malformed"),
])
def test_an_unreadable_file_counts_as_committed(control, data, why):
    write(control, data)
    with pytest.raises(GuestError, match=why):
        committed.read_record(control)
    refusal = committed.refusal(control, os.getpid(), "thaw")
    assert refusal.startswith(f"refusing to thaw guest pid {os.getpid()}: state file") and "\n" not in refusal
    committed.discard_stale(control)
    assert os.path.exists(committed.state_path(control)), "only a readable record is judged stale"


@pytest.mark.parametrize("field, value", [
    ("pid", True), ("pid", -1), ("pid", "1"), ("pid_start", 1.5), ("migration", 7),
    ("migration", "x" * 513), ("committed_unix", "now"), ("committed_unix", float("nan")),
    ("switch_round", -1), ("switch_round", "1"), ("page_size", 4096.0), ("regions", [[1, 2, 3]]),
    ("regions", [[-1, 4096]]), ("regions", [[0, 4096]] * 65), ("regions", "x"), ("regions", [[0, True]]),
])
def test_fields_are_checked(control, field, value):
    doc = json.loads(committed.new_record(os.getpid(), "m", "d").to_json())
    doc[field] = value
    write(control, json.dumps(doc).encode())
    with pytest.raises(GuestError, match=f"bad {field}"):
        committed.read_record(control)


def test_an_unwritable_directory_fails_before_anything_is_visible(tmp_path):
    with pytest.raises(GuestError, match="cannot write the state file .*/missing/g.sock.state"):
        committed.StagedRecord(str(tmp_path / "missing" / "g.sock"), committed.new_record(os.getpid(), "m", ""))


def test_a_new_guest_on_the_path_drops_a_dead_guests_record(sockdir):
    from migrator.guest.spawn import spawn_guest

    control = os.path.join(sockdir, "g.sock")
    gone = subprocess.Popen(["true"])
    gone.wait()
    write(control, committed.CommitRecord("old", "d:1", 1.0, gone.pid, 1, 1).to_json())
    open(control, "w").close()     # and the socket file the killed guest left behind
    with spawn_guest(control, size=4 << 20, dirty_rate=1000, extra_args=["--exit-with-parent"]) as guest:
        assert not os.path.exists(committed.state_path(control))
        with guest.client() as client:
            assert client.commit_record() is None
            client.pause()
            client.resume()          # nothing refuses a guest no record names
