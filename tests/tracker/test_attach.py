"""``migrator track --pid``: a process that knows nothing of migrator, tracked by injection.

The target is ``scripts/harness/attach_target.c``; the tests choose exactly which pages it writes, from which
thread, in which mapping, and check that exactly those are reported; that the target keeps
running and keeps nothing of migrator (no fd, no tracer, no registration) however tracking ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from harness.attach import Target, build, migrator_cli, pages_in, wait_for
from tracker_helpers import need

from migrator.core.errors import TrackerError, TrackerUnavailable
from migrator.trace.file import read_trace
from migrator.trace.summary import summarize
from migrator.tracker import features
from migrator.tracker.target import attach, why_untracked
from migrator.tracker.maps import Mapping


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return build(tmp_path_factory.mktemp("attach"))


@pytest.fixture
def target(binary):
    need(features.pagemap_scan_missing() or features.wp_async_missing())
    made = Target(binary)
    yield made
    made.close()


def written(interval, start: int, pages: int) -> set[int]:
    found = set()
    for runs in interval.written.values():
        found |= pages_in(runs, start, pages)
    return found


def test_exact_sets_across_intervals_threads_and_new_mappings(target):
    region = target.map(64)
    shared = target.map(16, "shm")
    with attach(target.pid) as tracker:
        assert tracker.stopped_s < 1.0
        tracker.collect()
        target.write(region, 3, 2)
        target.write(region, 10, 3, thread=True)
        target.write(shared, 5, 1)
        interval = tracker.collect()
        assert written(interval, region, 64) == {3, 4, 10, 11, 12}
        assert written(interval, shared, 16) == {5}
        assert written(tracker.collect(), region, 64) == set()

        fresh = target.map(8)
        target.write(fresh, 1, 2)
        target.write(region, 63, 1, thread=True)
        interval = tracker.collect()
        assert written(interval, fresh, 8) == {1, 2}
        assert written(interval, region, 64) == {63}

        target.write(fresh, 7, 1)
        interval = tracker.collect()
        assert written(interval, fresh, 8) == {7}
        target.ask(f"unmap {fresh:x} 8")
        target.write(region, 0, 1)
        interval = tracker.collect()
        assert written(interval, region, 64) == {0}
        assert not any(m.start <= fresh < m.end for m in tracker.mappings)


def test_a_new_mapping_written_before_and_after_it_is_registered_is_one_sorted_set(target):
    """Pages a new mapping got before its registration and the ones written after it, before the
    next scan, are one set of sorted, non-overlapping runs (what a trace file must hold)."""
    with attach(target.pid) as tracker:
        fresh = target.map(8)
        target.write(fresh, 4, 3)
        tracker.refresh()                  # registered now: pages 4-6 are pending
        target.write(fresh, 0, 5)          # 0-4 since, overlapping page 4
        interval = tracker.collect()
        runs = next(r for m, r in interval.written.items() if m.start <= fresh < m.end)
        assert runs == [(fresh, 7)]
        assert not any(m.start <= fresh < m.end for m in tracker.collect().written)


def test_registration_is_write_protect_only_and_ends_with_the_tracker(target):
    region = target.map(16)
    tracker = attach(target.pid)
    try:
        flags = target.vmflags(region)
        assert "uw" in flags and "um" not in flags      # WP only: never MISSING, which blocks
        assert not any("userfaultfd" in fd for fd in target.fds())
        assert target.tracer() == "0"
    finally:
        tracker.close()
    assert "uw" not in target.vmflags(region)
    target.write(region, 0, 16)


def test_untracked_mappings_are_listed_with_a_reason():
    def mapping(perms, path, flags=()):
        return Mapping(0x1000, 0x3000, perms, path, frozenset(flags))

    assert why_untracked(mapping("rw-p", "")) is None
    assert why_untracked(mapping("rw-p", "[heap]")) is None
    assert why_untracked(mapping("rw-s", "/memfd:x (deleted)")) is None
    assert why_untracked(mapping("r--p", "/usr/lib/libc.so.6")) == ""
    assert "hugetlb" in why_untracked(mapping("rw-p", "", ["ht"]))
    assert ".data" in why_untracked(mapping("rw-p", "/usr/lib/libc.so.6"))
    assert "regular file" in why_untracked(mapping("rw-s", "/var/db/file"))


def test_the_cli_lists_the_targets_data_mapping_as_untracked(target, tmp_path):
    out, trace_path = tmp_path / "t.json", tmp_path / "t.trace"
    cli = migrator_cli("track", "--pid", str(target.pid), "--interval", "0.1", "--duration", "0.5", "--json", str(out),
                       "--record", str(trace_path))
    stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 0, stderr
    summary = json.loads(out.read_text())
    assert {"dirty_rate", "wss_pages", "stopped_ms", "untracked", "intervals"} <= summary.keys()
    assert any(u["path"].endswith("attach_target") and u["size"] > 0 and ".data" in u["reason"]
               for u in summary["untracked"])
    assert 3 <= len(summary["intervals"]) <= 6
    assert "attached to process" in stdout and "untracked" in stdout
    trace = read_trace(trace_path)
    assert summarize(trace) == summary and trace.pid == target.pid


def test_sigkill_of_the_tracker_mid_run_leaves_the_target_writing(target):
    spin = int(target.ask("spin"), 16)
    region = target.map(16)
    cli = migrator_cli("track", "--pid", str(target.pid), "--interval", "0.05")
    try:
        assert "attached" in cli.stdout.readline()
        wait_for(lambda: "uw" in target.vmflags(region), 10, "the registration")
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
    finally:
        cli.kill()
        cli.communicate(timeout=10)
    wait_for(lambda: "uw" not in target.vmflags(region), 10, "the registration to end with the tracker")
    before = target.count()
    wait_for(lambda: target.count() > before, 10, "the spinner to go on writing")
    target.write(region, 0, 16, thread=True)
    assert target.tracer() == "0"
    assert not any("userfaultfd" in fd for fd in target.fds())
    assert "uw" not in target.vmflags(spin)


def test_a_target_that_exits_ends_the_run_with_the_data_so_far(target, tmp_path):
    out = tmp_path / "t.json"
    cli = migrator_cli("track", "--pid", str(target.pid), "--interval", "0.05", "--duration", "30", "--json", str(out))
    try:
        assert "attached" in cli.stdout.readline()
        while "dirty" not in cli.stdout.readline():
            pass   # the untracked lines, then the first interval
        target.proc.stdin.write(b"exit\n")
        target.proc.stdin.flush()
        stdout, stderr = cli.communicate(timeout=30)
    finally:
        cli.kill()
    assert cli.returncode == 0, stderr
    assert f"process {target.pid} exited" in stdout
    assert json.loads(out.read_text())["intervals"]


def test_sigint_ends_the_run_and_writes_the_outputs(target, tmp_path):
    out = tmp_path / "t.json"
    cli = migrator_cli("track", "--pid", str(target.pid), "--interval", "0.05", "--json", str(out))
    try:
        assert "attached" in cli.stdout.readline()
        cli.send_signal(signal.SIGINT)
        _stdout, stderr = cli.communicate(timeout=30)
    finally:
        cli.kill()
    assert cli.returncode == 130, stderr
    assert "Traceback" not in stderr
    json.loads(out.read_text())
    assert target.tracer() == "0"


def test_a_missing_pid_is_one_line():
    result = subprocess.run([sys.executable, "-m", "migrator", "track", "--pid", str(4194000)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == "migrator: TrackerError: no such process: 4194000\n"
    with pytest.raises(TrackerError, match="no such process"):
        attach(4194001)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user (setpriv)")
def test_missing_rights_are_one_line_saying_how_to_grant_them(target):
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         sys.executable, "-m", "migrator", "track", "--pid", str(target.pid)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": "/"})
    assert result.returncode == 1, result.stderr
    line = result.stderr
    assert line.count("\n") == 1 and line.startswith("migrator: TrackerUnavailable: "), line
    assert "CAP_SYS_PTRACE" in line and "ptrace" in line
    target.write(target.map(1), 0, 1)


def test_an_already_traced_target_is_refused_in_one_line(target):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from migrator.tracker import ptrace; ptrace.ptrace_seize(int(sys.argv[1]), 0); "
         "print('held', flush=True); time.sleep(60)", str(target.pid)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(TrackerUnavailable, match=f"already traced \\(by process {holder.pid}\\)"):
            attach(target.pid)
    finally:
        holder.kill()
        holder.wait(timeout=10)
        holder.stdout.close()
    wait_for(lambda: target.tracer() == "0", 10, "the holder's trace to end")
    target.write(target.map(1), 0, 1)
