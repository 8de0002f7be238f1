"""A receiver under load: Layouts larger than it can hold, more connections waiting to
authenticate than its caps allow, a flood of idle connections, a full file table.

Real ``migrator receive`` processes on 127.0.0.1 (idle connections also come from 127.0.0.2 and
127.0.0.3, loopback addresses too, to be other peers), real guests, real migrations. The flood
and file-table tests open thousands of connections: they run with the fault suite (``-m faults``).
"""

from __future__ import annotations

import functools
import os
import resource
import socket
from contextlib import asynccontextmanager

import pytest
import trio

from harness.hosts import Loopback, start_migrate, start_receiver, vm_rss
from migrator import protocol as p
from migrator.core.meminfo import mem_available
from migrator.core.model import Region
from migrator.core.tokens import load_default_token
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.transport.net import FEATURES

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
FD_LIMIT = 1024                  # the usual default soft limit, the one the finding ran out of
FLOOD = 3000
RSS_SLACK = 16 * MiB
THREAD_LINGER_S = 10             # trio's worker-thread cache keeps an idle thread this long


class Peer:
    """A source's end of one connection, driven by hand through the codec."""

    def __init__(self, stream: trio.SocketStream, token: bytes | None) -> None:
        self.stream = stream
        self.conn = p.Connection(p.Role.SOURCE, token=token)

    @classmethod
    async def authenticated(cls, address: str, token: bytes) -> Peer:
        host, port = address.rsplit(":", 1)
        peer = cls(await trio.open_tcp_stream(host, int(port)), token)
        await peer.send(p.Hello(streams=1, features=FEATURES))
        assert isinstance(await peer.receive(), p.Hello)
        await peer.send(p.Auth())
        return peer

    async def send(self, event: p.Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def receive(self) -> p.Event:
        while (event := self.conn.next_event()) is p.NEED_DATA:
            self.conn.receive_data(await self.stream.receive_some(65536))
        return event


def idle_connections(address: str, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """``count`` connections from ``source`` that never send a byte (blocking: a worker thread)."""
    host, port = address.rsplit(":", 1)
    opened = []
    try:
        for _ in range(count):
            sock = socket.socket()
            opened.append(sock)
            sock.settimeout(10)
            sock.bind((source, 0))
            sock.connect((host, int(port)))
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """The receiver closed ``sock`` (EOF or reset waiting); False if it is open and silent."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def session_closed(peer: Peer) -> bool:
    """The receiver closed ``peer``'s connection (it says nothing after the handshake until the
    Layout, so silence means open)."""
    with trio.move_on_after(0.1):
        try:
            return await peer.stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True
    return False


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@asynccontextmanager
async def scene(sockdir, *, receiver_args=(), timeout: float = 120):
    """A receiver on 127.0.0.1 serving any number of migrations; ``migrate(name)`` runs a real one."""
    guests = []
    with Loopback() as bed, trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            receiver = await start_receiver(nursery, bed, sockdir, token_file=None, once=False, extra=receiver_args)

            async def migrate(name: str) -> dict:
                """Spawn a guest, migrate it with ``migrator migrate`` (the default token), quit
                the resumed guest; the receiver's report."""
                guest = await trio.to_thread.run_sync(functools.partial(
                    spawn_guest, os.path.join(sockdir, f"{name}.sock"), size=16 * MiB, dirty_rate=500, fill="text",
                    extra_args=["--exit-with-parent"],
                ))
                guests.append(guest)
                child = await start_migrate(nursery, bed, guest.control, receiver.address, token_file=None,
                                            extra=["--quiet"])
                assert await child.wait(60) == 0, child.stderr.lines
                report = await receiver.wait_report()
                assert report["result"] == "resumed", report

                def quit_guest() -> None:
                    with GuestClient(report["guest_control"]) as client:
                        client.quit()

                await trio.to_thread.run_sync(quit_guest)
                os.unlink(receiver.report)
                return report

            try:
                yield receiver, migrate
            finally:
                nursery.cancel_scope.cancel()
                for guest in guests:
                    guest.kill()


@pytest.mark.parametrize("limit", ["max-size", "memory"])
async def test_a_layout_larger_than_the_receiver_can_hold_is_refused_before_any_memory(sockdir, limit):
    if limit == "max-size":
        args, size, needle = ["--max-size", "64M"], 128 * MiB, "exceeds this receiver's limit of 64 MiB (--max-size)"
    else:
        args, needle = ["--max-size", "1T"], "exceeds the memory available on this receiver now"
        size = ((mem_available() or 0) + 4 * GiB) // GiB * GiB
    async with scene(sockdir, receiver_args=args) as (receiver, migrate):
        rss = vm_rss(receiver.pid)
        start = len(receiver.stderr.lines)
        peer = await Peer.authenticated(receiver.address, load_default_token())
        await peer.send(p.Layout(regions=(Region(0x7F0000000000, size),), page_size=PAGE, meta={}))
        with trio.fail_after(10):
            answer = await peer.receive()
        assert isinstance(answer, p.Abort) and needle in answer.reason, answer
        line = await receiver.stderr.wait_for("migration failed", start=start)
        assert needle in line
        await peer.stream.aclose()
        assert children(receiver.pid) == [], "no restore guest was started"
        assert "receiving" not in " ".join(receiver.stderr.lines[start:])
        assert vm_rss(receiver.pid) - rss < RSS_SLACK
        await migrate("after")   # and it keeps serving


async def test_connections_past_the_handshake_caps_close_the_oldest_waiting(sockdir):
    """Per-peer cap 4, total cap 6. Authenticated sessions never count; each connection past a cap
    closes the oldest waiting one (of its peer, else of all); a real migration gets through."""
    args = ["--max-handshakes", "6", "--max-handshakes-per-peer", "4", "--handshake-timeout", "60"]
    async with scene(sockdir, receiver_args=args) as (receiver, migrate):
        token = load_default_token()
        sessions = [await Peer.authenticated(receiver.address, token) for _ in range(8)]   # more than any cap
        a = await trio.to_thread.run_sync(idle_connections, receiver.address, 6, "127.0.0.2")
        b = await trio.to_thread.run_sync(idle_connections, receiver.address, 3, "127.0.0.3")
        try:
            start = len(receiver.stderr.lines)
            await migrate("through")      # its connection closes the oldest waiting one in all
            await trio.sleep(0.2)
            closed = [closed_by_peer(sock) for sock in a + b]
            # a1, a2: past 127.0.0.2's cap; a3: past the total at b3; a4: past the total at the migration
            assert closed == [True] * 4 + [False] * 5, closed
            assert not any([await session_closed(peer) for peer in sessions]), "authenticated sessions stay"
            caps = [line for line in receiver.stderr.lines if "closing the oldest connections" in line]
            assert len(caps) == 1 and "127.0.0.2" in caps[0], caps   # one line for the burst
            assert not [line for line in receiver.stderr.lines[start:] if "failed" in line]
        finally:
            close_all(a + b)
            for peer in sessions:
                await peer.stream.aclose()


async def settled_rss(pid: int, timeout: float = THREAD_LINGER_S + 5) -> int:
    """``pid``'s RSS once its worker threads are gone (trio keeps an idle one THREAD_LINGER_S,
    and its malloc arena with it): a level that does not depend on when the last migration ran."""
    with trio.move_on_after(timeout):
        while len(os.listdir(f"/proc/{pid}/task")) > 1:
            await trio.sleep(0.2)
    return vm_rss(pid)


@pytest.mark.faults
async def test_a_flood_of_idle_connections_neither_blocks_a_migration_nor_grows_the_receiver(sockdir):
    async with scene(sockdir, timeout=150) as (receiver, migrate):
        resource.prlimit(receiver.pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
        await migrate("warm-up")          # what a first migration allocates for good is part of idle
        idle = await settled_rss(receiver.pid)
        start = len(receiver.stderr.lines)
        flood = await trio.to_thread.run_sync(idle_connections, receiver.address, FLOOD)
        try:
            await trio.sleep(0.5)
            assert open_fds(receiver.pid) < FD_LIMIT // 2, "the cap keeps the file table from filling"
            report = await migrate("during")
            assert report["result"] == "resumed"
        finally:
            close_all(flood)
        rss = await settled_rss(receiver.pid)
        assert rss <= 1.2 * idle, f"idle {idle / MiB:.1f} MiB, after the flood {rss / MiB:.1f} MiB"
        logged = receiver.stderr.lines[start:]
        assert not [line for line in logged if "Traceback" in line or "EMFILE" in line], logged
        flood_lines = [line for line in logged if "receiving" not in line and "resumed" not in line]
        assert len(flood_lines) <= 2, flood_lines    # the cap's burst, the silent connections' burst


@pytest.mark.faults
async def test_a_full_file_table_pauses_accepting_with_one_line(sockdir):
    """Caps raised above the file limit, so that idle connections fill it: accept fails with
    EMFILE, logged once for the burst; once they go, the receiver accepts and migrates again."""
    args = ["--max-handshakes", "4096", "--max-handshakes-per-peer", "4096", "--handshake-timeout", "60"]
    async with scene(sockdir, receiver_args=args, timeout=150) as (receiver, migrate):
        resource.prlimit(receiver.pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
        start = len(receiver.stderr.lines)
        flood = await trio.to_thread.run_sync(idle_connections, receiver.address, FD_LIMIT + 500)
        try:
            line = await receiver.stderr.wait_for("cannot accept connections", start=start)
            assert "EMFILE" in line
            await trio.sleep(1.5)          # fifteen pauses and retries, all in the same burst
            assert open_fds(receiver.pid) == FD_LIMIT
        finally:
            close_all(flood)
        await migrate("after")
        logged = receiver.stderr.lines[start:]
        assert [x for x in logged if "cannot accept" in x] == [line], logged
        assert not [x for x in logged if "Traceback" in x], logged
