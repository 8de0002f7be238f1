"""Real guest processes over their real control sockets."""

from __future__ import annotations

import json
import mmap
import os
import socket
import time

import pytest

from migrator.core.errors import GuestError
from migrator.native.workload import ffi as workload_ffi
from migrator.guest.client import GuestClient
from migrator.guest.control import MAX_LINE
from migrator.guest.layout import Pattern
from migrator.guest.spawn import spawn_guest
from migrator.core.model import PAGE_SIZE
from migrator.source.throttle import Throttle
from migrator.tracker import _sys, features
from migrator.tracker._uapi import PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, ffi
from migrator.tracker.memory import ProcessMemory

SIZE = 16 << 20


def raw_exchange(path: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def wait_steps_beyond(client: GuestClient, steps: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (now := client.stats()["steps"]) <= steps:
        assert time.monotonic() < deadline, f"the guest stayed at step {now}"
        time.sleep(0.01)
    return now


def test_stats_attach_and_quit(guests):
    guest = guests(fill="text", pattern="hot:0.05:0.9", seed=3)
    with guest.client() as client:
        stats = client.stats()
        assert stats["state"] == "running" and stats["pid"] == guest.pid
        assert (stats["fill"], stats["seed"], stats["dirty_rate"], stats["size"]) == ("text", 3, None, SIZE)
        hot = Pattern.parse(stats["pattern"])   # the hot set as realised: a whole number of pages
        assert (hot.kind, hot.fraction, hot.share) == ("hot", pytest.approx(0.05, abs=1e-3), pytest.approx(0.9))
        wait_steps_beyond(client, stats["steps"])
        attachment = client.attach("none")
        assert attachment.uffd is None and attachment.memfd is None and not attachment.restore
        assert attachment.layout.pid == guest.pid and attachment.layout.total_bytes == SIZE
        client.quit()
    assert guest.popen.wait(10) == 0
    assert not os.path.exists(guest.control)


def test_control_errors_get_an_error_reply_and_the_guest_keeps_running(guests):
    guest = guests()
    for payload, message in [
        (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
        (b"this is not json\n", "bad JSON"),
        (b'{"cmd": "pause", "at_step": "soon"}\n', "at_step must be an integer"),
        (b"[]\n", "must be a JSON object"),
        (b"x" * (MAX_LINE + 1) + b"\n", "longer than"),
    ]:
        reply = json.loads(raw_exchange(guest.control, payload))
        assert reply["ok"] is False and message in reply["error"]
    with guest.client() as client:
        with pytest.raises(GuestError, match="unknown command 'reboot'"):
            client.request("reboot")
        with pytest.raises(GuestError, match="tracker 'kvm'"):
            client.attach("kvm")
        steps = client.stats()["steps"]   # the same connection still works after errors
        wait_steps_beyond(client, steps)
    assert guest.alive()


def test_a_second_guest_cannot_take_a_live_control_socket(guests):
    guest = guests()
    with pytest.raises(GuestError, match="in use by another process"):
        spawn_guest(guest.control, size=SIZE, dirty_rate=None, ready_timeout=20)
    assert guest.alive()


def test_same_settings_and_steps_give_identical_regions_whatever_the_timing_and_backing(guests):
    options = {"seed": 9, "pattern": "hot:0.1:0.8", "dirty_rate": 200_000, "paused": True}
    one, twin, other = guests("one", **options), guests("twin", memfd=True, **options), guests("other", **{**options, "seed": 10})
    target = 30_000
    digests = []
    for guest, stops in ((one, [target]), (twin, [1, 7_000, 7_001, target]), (other, [target])):
        with guest.client() as client:
            assert client.stats()["steps"] == 0
            for stop in stops:   # the twin runs in several spurts, with pauses in between
                client.resume(until_step=stop)
                assert client.pause(at_step=stop) == stop
            assert client.stats()["state"] == "paused"
            digests.append(client.digest())
            assert client.check()["clean"]
    assert digests[0] == digests[1] != digests[2]


def test_paused_copy_into_a_restore_guest_continues_identically(guests):
    source = guests("source", fill="text", seed=4, dirty_rate=100_000)
    target = guests("target", restore=True)
    with source.client() as src, target.client() as dst:
        assert dst.stats()["state"] == "restoring"
        assert dst.check()["problem"].startswith("control block: bad magic")
        with pytest.raises(GuestError, match="cannot resume from this region: control block: bad magic"):
            dst.resume()
        steps = src.pause()
        a, b = src.attach("none").layout, dst.attach("none")
        assert b.restore and b.layout.regions[0].start != a.regions[0].start
        data = ProcessMemory(a.pid).read(a.regions[0].start, SIZE)
        ProcessMemory(b.layout.pid).write(b.layout.regions[0].start, data)
        assert dst.digest() == src.digest()
        assert dst.check()["clean"] and dst.stats()["steps"] == steps
        dst.resume(until_step=steps + 30_000)
        src.resume(until_step=steps + 30_000)
        assert dst.pause(at_step=steps + 30_000) == src.pause(at_step=steps + 30_000) == steps + 30_000
        assert dst.digest() == src.digest()
        assert dst.stats()["state"] == "paused" and dst.stats()["dirty_rate"] == 100_000


def in_the_middle_of_a_step(region) -> bool:
    ctl = workload_ffi.cast("struct guest_control *", workload_ffi.from_buffer(bytes(region[:PAGE_SIZE])))
    return ctl.in_flight == ctl.steps + 1


def test_copy_of_a_guest_frozen_mid_step_continues_identically(guests):
    source = guests("source", seed=5, memfd=True)   # unlimited: nearly always inside a step
    target = guests("target", restore=True, memfd=True)
    with source.client() as src, target.client() as dst:
        mine, theirs = src.attach("none"), dst.attach("none")
        throttle = Throttle(source.pid)   # freezes the guest the way a migrator does
        try:
            with mmap.mmap(mine.memfd, SIZE, prot=mmap.PROT_READ) as a, mmap.mmap(theirs.memfd, SIZE) as b:
                for _attempt in range(20):
                    throttle.freeze()
                    b[:] = a[:]
                    throttle.thaw()
                    if in_the_middle_of_a_step(b):
                        break
                else:
                    pytest.fail("never caught the guest in the middle of a step")
        finally:
            throttle.close()
            mine.close()
            theirs.close()
        steps = dst.stats()["steps"]
        assert dst.check()["clean"]
        goal = src.pause()   # the running source is past the copy by now, by however much
        assert goal >= steps
        dst.resume(until_step=goal)
        assert dst.pause(at_step=goal) == goal
        assert dst.digest() == src.digest()


def test_throttled_rate_is_within_ten_percent(guests):
    rate = 20_000
    guest = guests(dirty_rate=rate)
    with guest.client() as client:
        time.sleep(0.2)
        s0, t0 = client.stats()["steps"], time.monotonic()
        time.sleep(1.5)
        s1, t1 = client.stats()["steps"], time.monotonic()
        measured = (s1 - s0) / (t1 - t0)
        assert 0.9 * rate <= measured <= 1.1 * rate
        assert 0.85 * rate <= client.stats()["write_rate"] <= 1.15 * rate


def test_a_stopped_guest_does_not_burst_to_repay_the_stop(guests):
    rate = 10_000
    guest = guests(dirty_rate=rate)
    throttle = Throttle(guest.pid)
    with guest.client() as client:
        time.sleep(0.1)
        s0, t0 = client.stats()["steps"], time.monotonic()
        throttle.freeze()
        frozen = time.monotonic()
        time.sleep(0.5)
        throttle.thaw()
        thawed = time.monotonic()
        time.sleep(0.3)
        s1, t1 = client.stats()["steps"], time.monotonic()
        throttle.close()
    running = (frozen - t0) + (t1 - thawed)
    # at most 100 ms of the stop is made up; repaying all of it would add 5,000 steps
    assert rate * running * 0.8 <= s1 - s0 <= rate * (running + 0.1) * 1.1 + 100


def test_sync_wp_attach_and_migrator_disconnect_leave_the_guest_running(guests):
    missing = features.sync_wp_missing() or features.wp_async_missing() or features.pagemap_scan_missing()
    if missing:
        pytest.skip(missing)
    guest = guests()
    watcher = guest.client()
    migrator = guest.client()
    attachment = migrator.attach("sync-wp")
    try:
        region = attachment.layout.regions[0]
        with pytest.raises(GuestError, match="another migrator or checkpoint is tracking this guest"):
            watcher.attach("wp-async")
        _sys.uffdio_writeprotect(attachment.uffd, region.start, region.length, protect=True)
        time.sleep(0.2)
        blocked = watcher.stats()["steps"]
        time.sleep(0.3)
        assert watcher.stats()["steps"] == blocked, "the writer should block on the protected page"
        migrator.close()   # the migrator vanishes; it still holds the uffd, the guest must not care
        wait_steps_beyond(watcher, blocked, timeout=5)
        async_attachment = watcher.attach("wp-async")
        try:
            assert async_attachment.uffd is not None
            fd = os.open(f"/proc/{guest.pid}/pagemap", os.O_RDONLY)
            try:   # CHECK_WPASYNC fails with EPERM unless the region is registered WP_ASYNC again
                vec = ffi.new("struct page_region[]", 16)
                _sys.pagemap_scan(fd, region.start, region.end, vec, 16, flags=PM_SCAN_CHECK_WPASYNC,
                                  category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
            finally:
                os.close(fd)
        finally:
            async_attachment.close()
    finally:
        attachment.close()
        watcher.close()
    assert guest.alive()


def test_one_tracker_at_a_time_until_its_connection_closes(guests):
    missing = features.wp_async_missing()
    if missing:
        pytest.skip(missing)
    guest = guests()
    first, second = guest.client(), guest.client()
    first.attach("wp-async")
    first.attach("wp-async")                                  # the owner may attach again
    with pytest.raises(GuestError, match="another migrator or checkpoint is tracking this guest"):
        second.attach("wp-async")
    assert second.attach("none").uffd is None                  # looking is always allowed
    first.close()
    deadline = time.monotonic() + 5
    while True:                                                # the guest notices the close
        try:
            assert second.attach("wp-async").uffd is not None
            break
        except GuestError:
            assert time.monotonic() < deadline, "tracking was not released when its owner left"
            time.sleep(0.02)
    second.close()


def test_a_request_at_a_step_boundary_is_not_starved_by_a_writer_without_limit(guests):
    """A lock is not fair: a writer that released it and took it again at once kept the
    control thread waiting for the next step boundary for up to 1.6 s (set-tag, which starts
    every migration). Each request now waits for one batch (about a millisecond); the bound
    here is 200 times that, so only starvation can fail it."""
    guest = guests(fill="random")            # dirty_rate None: writes without limit
    with guest.client() as client:
        wait_steps_beyond(client, client.stats()["steps"])
        for k in range(20):
            started = time.perf_counter()
            client.set_tag(f"tag-{k}")
            assert time.perf_counter() - started < 0.25, f"set-tag {k} waited for the writer"
            time.sleep(0.01)
        assert client.stats()["state"] == "running"
