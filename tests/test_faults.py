"""Faults between two hosts: network namespaces, a shaped veth link, the real CLIs.

The receiver runs in host b, the guest and ``migrator migrate`` in host a. Each case injects one
fault at a known point of round 0 (by bytes on the wire, not by time) and checks what the issue
promises: a slow jittery link still converges and verifies; for every other fault the source
guest keeps running (its step counter advances), no destination guest resumes, and the migrator
exits non-zero with one line on stderr saying why.

Sizes: a 32 MiB guest of random (incompressible) pages over a 160 Mbit/s link gives a round 0 of
about 1.7 s; faults strike after 3-4 MiB.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from harness import netns
from harness.faultproxy import FaultProxy, Faults
from harness.hosts import (
    Child, Receiver, spawn_guest_in, start_migrate, start_receiver, steps_advance, write_token,
)

MiB = 1 << 20
LINK = "160mbit"
GUEST_SIZE = 32 * MiB
FAULT_AT = 4 * MiB
ROUND_TIMEOUT_S = 4.0          # round 0 needs ~1.7 s on LINK; a stalled or cut round needs forever
EXIT_TIMEOUT_S = 25.0          # any failing migrator must be gone by then
CASE_TIMEOUT_S = 60.0          # a whole case, guest start and teardown included
# how the transport words a peer that hung up or reset the connection
PEER_GONE = ("the peer closed the connection", "write failed (", "read failed (", "connection lost")

_reason = netns.unavailable()
pytestmark = [pytest.mark.faults, pytest.mark.skipif(_reason is not None, reason=str(_reason))]


@pytest.fixture
def bed(sockdir):
    """Torn down before ``sockdir``: nothing left in the hosts writes sockets into it then."""
    with netns.Testbed(rate=LINK) as testbed:
        yield testbed


@dataclass
class Scene:
    bed: netns.Testbed
    workdir: str
    token: str
    guest_control: str
    receiver: Receiver
    nursery: trio.Nursery

    async def proxy(self, faults: Faults, **kwargs) -> tuple[FaultProxy, str]:
        host, port = self.receiver.address.rsplit(":", 1)
        proxy = FaultProxy(host, int(port), faults, listen=(self.bed.b.address, 0), netns=self.bed.b.netns, **kwargs)
        await self.nursery.start(proxy.serve)
        return proxy, proxy.address

    async def migrate(self, to: str | None = None, *, token: str | None = None, extra=()) -> Child:
        return await start_migrate(
            self.nursery, self.bed, self.guest_control, to or self.receiver.address,
            token_file=token or self.token, report=os.path.join(self.workdir, "run.json"),
            extra=["--quiet", "--round-timeout", str(ROUND_TIMEOUT_S), *extra],
        )

    def source_report(self) -> dict:
        with open(os.path.join(self.workdir, "run.json")) as f:
            return json.load(f)

    def dest_report(self) -> dict | None:
        try:
            with open(self.receiver.report) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    async def wait_wire(self, nbytes: int) -> None:
        """Until host a's end of the link has sent ``nbytes`` more (the fault's moment)."""
        start = await trio.to_thread.run_sync(self.bed.tx_bytes, "a")
        while await trio.to_thread.run_sync(self.bed.tx_bytes, "a") - start < nbytes:
            await trio.sleep(0.01)

    async def assert_source_guest_runs(self) -> None:
        await trio.to_thread.run_sync(functools.partial(steps_advance, self.guest_control, within=5.0))

    async def assert_no_destination_resumed(self) -> None:
        """Once the receiver (--once) is done: no restore guest runs, its report says discarded."""
        await self.receiver.wait(15)     # it writes its report after logging the failure
        running = [g for g in await trio.to_thread.run_sync(self.receiver.restore_guests) if g["state"] == "running"]
        assert not running, f"a destination guest resumed: {running}"
        report = self.dest_report()
        assert report is None or report["result"] == "discarded", report


@asynccontextmanager
async def scene(bed, sockdir, *, dirty_rate: float = 2000, receiver_token: str | None = None, idle_timeout: float = 3.0):
    token = write_token(sockdir)
    control = os.path.join(sockdir, "src.sock")
    guest = await trio.to_thread.run_sync(functools.partial(
        spawn_guest_in, bed.a.netns, control, size=GUEST_SIZE, dirty_rate=dirty_rate, fill="random",
        extra_args=["--exit-with-parent"],
    ))
    try:
        async with trio.open_nursery() as nursery:
            receiver = await start_receiver(
                nursery, bed, sockdir, token_file=receiver_token or token, idle_timeout=idle_timeout
            )
            with trio.fail_after(CASE_TIMEOUT_S):
                yield Scene(bed, sockdir, token, control, receiver, nursery)
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(guest.kill)


async def expect_failure(migrate: Child, *needles: str) -> str:
    """The migrator exits non-zero with exactly one stderr line, naming one of ``needles``."""
    status = await migrate.wait(EXIT_TIMEOUT_S)
    lines = [line for line in migrate.stderr.lines if line.strip()]
    assert status != 0
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("migrator: ") and any(n in lines[0] for n in needles), lines[0]
    return lines[0]


async def expect_receiver_refused(receiver: Receiver, needle: str = "failed") -> str:
    """The receiver logged one line for the failed migration."""
    line = await receiver.stderr.wait_for(needle, timeout=15)
    failures = [x for x in receiver.stderr.lines if "failed" in x]
    assert len(failures) == 1, failures
    return line


# --- the proxy itself, over plain TCP ---------------------------------------------------------


async def _through_proxy(
    bed, faults: Faults, payload: bytes, *, patience: float = 3.0, **kwargs
) -> tuple[bytes, FaultProxy, BaseException | None]:
    """Send ``payload`` from host a through a proxy in host b to a sink in b; what arrived
    (waiting at most ``patience`` seconds for it), the proxy, and the client's error if any."""
    received = bytearray()
    done = trio.Event()

    async def sink(stream) -> None:
        try:
            while data := await stream.receive_some(65536):
                received.extend(data)
        except trio.BrokenResourceError:
            pass
        done.set()

    error = None
    async with trio.open_nursery() as nursery:
        listener = netns.open_tcp_listener(bed.b.address, 0, netns=bed.b.netns)
        nursery.start_soon(trio.serve_listeners, sink, [listener])
        proxy = FaultProxy(bed.b.address, listener.socket.getsockname()[1], faults,
                           listen=(bed.b.address, 0), netns=bed.b.netns, **kwargs)
        await nursery.start(proxy.serve)
        host, port = proxy.address.rsplit(":", 1)
        client = await netns.open_tcp_stream(host, int(port), netns=bed.a.netns)
        with trio.move_on_after(patience):
            try:
                await client.send_all(payload)
                await client.send_eof()
                await done.wait()
                # the whole payload may sit in socket buffers before a cut lands: a read then
                # sees the reset (or the proxy's clean close)
                await client.receive_some(1)
            except trio.BrokenResourceError as exc:
                error = exc
        await client.aclose()
        nursery.cancel_scope.cancel()
    return bytes(received), proxy, error


async def test_proxy_faults_land_at_their_offsets(bed):
    payload = os.urandom(1 * MiB)
    got, proxy, _ = await _through_proxy(bed, Faults(corrupt_at=123_457), payload, record_limit=MiB)
    assert len(got) == len(payload) and proxy.statistics().corrupted
    assert [i for i in range(len(got)) if got[i] != payload[i]] == [123_457]
    assert got[123_457] == payload[123_457] ^ 0x10
    assert bytes(proxy.recordings[0]) == payload, "the recording holds what the client sent"

    got, proxy, error = await _through_proxy(bed, Faults(cut_at=300_000), payload)
    assert got == payload[:300_000] and proxy.statistics().cut
    assert isinstance(error, trio.BrokenResourceError), "a cut resets the client's connection"

    got, proxy, error = await _through_proxy(bed, Faults(stall_at=200_000), payload, patience=0.5)
    assert got == payload[:200_000] and proxy.statistics().stalled and error is None


async def test_proxy_rate_caps_throughput(bed):
    payload = os.urandom(2 * MiB)
    start = trio.current_time()
    got, _, _ = await _through_proxy(bed, Faults(rate=4e6), payload)
    assert got == payload
    assert trio.current_time() - start >= 0.9 * len(payload) / 4e6


async def test_proxy_delay_adds_latency_both_ways(bed):
    async def echo(stream) -> None:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        listener = netns.open_tcp_listener(bed.b.address, 0, netns=bed.b.netns)
        nursery.start_soon(trio.serve_listeners, echo, [listener])
        proxy = FaultProxy(bed.b.address, listener.socket.getsockname()[1], Faults(delay_s=0.03, jitter_s=0.01),
                           listen=(bed.b.address, 0), netns=bed.b.netns)
        await nursery.start(proxy.serve)
        host, port = proxy.address.rsplit(":", 1)
        client = await netns.open_tcp_stream(host, int(port), netns=bed.a.netns)
        with trio.fail_after(5):
            for _ in range(3):
                start = trio.current_time()
                await client.send_all(b"ping")
                assert await client.receive_some(16) == b"ping"
                assert trio.current_time() - start >= 0.06   # 30 ms each way, at least
        await client.aclose()
        nursery.cancel_scope.cancel()


# --- migrations under faults -------------------------------------------------------------------


async def test_slow_jittery_link_converges_and_verifies(bed, sockdir):
    async with scene(bed, sockdir, dirty_rate=500) as s:
        proxy, to = await s.proxy(Faults(delay_s=0.003, jitter_s=0.004))
        migrate = await s.migrate(to, extra=["--downtime-ms", "100"])
        status = await migrate.wait(60)
        assert status == 0, migrate.stderr.lines
        report = s.source_report()
        assert report["verified"] and report["result"] == "committed"
        assert report["settings"]["frame_macs"] is True, "between hosts, without TLS, every frame carries a MAC"
        await s.receiver.wait(15)
        dest = s.dest_report()
        assert dest["result"] == "resumed"
        assert proxy.statistics().forwarded >= GUEST_SIZE * 0.9, "the pages went through the jittery proxy"
        # the destination guest continues where the source stopped, intact
        await trio.to_thread.run_sync(steps_advance, dest["guest_control"])
        from migrator.guest.client import GuestClient

        def check_and_quit() -> dict:
            with GuestClient(dest["guest_control"]) as client:
                result = client.check()
                client.quit()
            return result

        assert (await trio.to_thread.run_sync(check_and_quit))["clean"]


async def test_link_down_mid_round(bed, sockdir):
    async with scene(bed, sockdir) as s:
        migrate = await s.migrate()
        await s.wait_wire(FAULT_AT)
        await trio.to_thread.run_sync(bed.set_link, False, "a")
        await expect_failure(migrate, "round 0 (--round-timeout) took more than")
        assert s.source_report()["rounds"] == [], "the link went down during round 0"
        await s.assert_source_guest_runs()
        await expect_receiver_refused(s.receiver)
        await s.assert_no_destination_resumed()


async def test_receiver_sigkill(bed, sockdir):
    async with scene(bed, sockdir) as s:
        migrate = await s.migrate()
        await s.wait_wire(FAULT_AT)
        s.receiver.kill(signal.SIGKILL)
        await expect_failure(migrate, *PEER_GONE)
        assert s.source_report()["rounds"] == []
        await s.assert_source_guest_runs()
        await s.assert_no_destination_resumed()


@pytest.mark.parametrize("tracker", ["wp-async", "sync-wp"])
async def test_migrator_sigkill_leaves_the_guest_running(bed, sockdir, tracker):
    async with scene(bed, sockdir) as s:
        migrate = await s.migrate(extra=["--tracker", tracker])
        await s.wait_wire(FAULT_AT)
        migrate.kill(signal.SIGKILL)
        assert await migrate.wait(5) == -signal.SIGKILL
        # with sync-wp the guest's writer hits protected pages that nobody resolves any more:
        # the guest must drop the registration when the migrator's connection dies
        await s.assert_source_guest_runs()
        await expect_receiver_refused(s.receiver)
        await s.assert_no_destination_resumed()
        assert s.receiver.process.returncode != 0


async def test_flipped_byte_aborts(bed, sockdir):
    async with scene(bed, sockdir) as s:
        proxy, to = await s.proxy(Faults(corrupt_at=3 * MiB + 12_345))
        migrate = await s.migrate(to)
        # best: the destination's Abort names the bad frame; the receiver may also hang up
        # before that Abort is read, and the line must then say so
        await expect_failure(migrate, "destination aborted: destination failed: payload", *PEER_GONE)
        assert proxy.statistics().corrupted
        await s.assert_source_guest_runs()
        line = await expect_receiver_refused(s.receiver)
        assert "MAC" in line or "corrupt" in line, line
        await s.assert_no_destination_resumed()


async def test_wrong_token_is_refused_before_any_page(bed, sockdir):
    other = write_token(sockdir, "other-token")
    async with scene(bed, sockdir, receiver_token=other) as s:
        migrate = await s.migrate()
        await expect_failure(migrate, "token", "authentication")
        await s.assert_source_guest_runs()
        await s.receiver.stderr.wait_for("failed", timeout=10)
        assert os.listdir(s.receiver.control_dir) == [], "no restore guest was even started"
        assert s.dest_report() is None
        assert s.receiver.process.returncode is None, "the receiver keeps serving"


async def test_stalled_stream_times_out(bed, sockdir):
    # the receiver waits longer than a round may take, so the migrator's --round-timeout fires
    async with scene(bed, sockdir, idle_timeout=ROUND_TIMEOUT_S + 2) as s:
        proxy, to = await s.proxy(Faults(stall_at=3 * MiB))
        migrate = await s.migrate(to)
        await expect_failure(migrate, "round 0 (--round-timeout) took more than")
        assert proxy.statistics().stalled
        assert s.source_report()["rounds"] == []
        await s.assert_source_guest_runs()
        await expect_receiver_refused(s.receiver)
        await s.assert_no_destination_resumed()
