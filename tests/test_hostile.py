"""Hostile input: a ``migrator receive`` that requires a token, listening on a namespace address.

Each case connects from the other host and sends what a hostile or broken peer could: random
bytes, truncated frames, authenticated frames naming addresses outside the declared layout, huge
lengths, a replayed recording of a real migration. Every time the receiver must log one line
naming what was wrong, apply nothing, keep serving (the next connection completes an
authenticated handshake) and keep its memory bounded (VmRSS from /proc).

Frames are built with ``migrator.protocol.Connection``, the codec the migrator itself uses; the
out-of-layout frame is assembled from the codec's parts with a valid MAC, because the codec
refuses to send such a frame.
"""

from __future__ import annotations

import functools
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from migrator import protocol as p
from migrator.core.model import Region
from migrator.protocol._frames import HEADER, MAGIC, TYPE_CODES, assemble
from migrator.protocol._wire import encode_meta
from harness import netns
from harness.faultproxy import FaultProxy, Faults
from harness.hosts import Receiver, spawn_guest_in, start_migrate, start_receiver, vm_rss, write_token
from migrator.transport.net import FEATURES

MiB = 1 << 20
PAGE = 4096
RSS_SLACK = 16 * MiB          # what refused connections may leave behind in the receiver, at most
JUNK = 40 * MiB               # more than RSS_SLACK: a receiver that buffered it would fail the check
REGION = Region(0x7F0000000000, 16 * PAGE)   # the smallest layout a restore guest accepts

_reason = netns.unavailable()
pytestmark = [pytest.mark.faults, pytest.mark.skipif(_reason is not None, reason=str(_reason))]


@pytest.fixture
def bed(sockdir):
    """Torn down before ``sockdir``: nothing left in the hosts writes sockets into it then."""
    with netns.Testbed() as testbed:
        yield testbed


class Peer:
    """A source's end of one connection, from host a, driven by hand through the codec."""

    def __init__(self, stream: trio.SocketStream, token: bytes | None) -> None:
        self.stream = stream
        self.conn = p.Connection(p.Role.SOURCE, token=token)

    async def send(self, event: p.Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def receive(self) -> p.Event:
        while (event := self.conn.next_event()) is p.NEED_DATA:
            self.conn.receive_data(await self.stream.receive_some(65536))
        return event

    async def handshake(self) -> None:
        await self.send(p.Hello(streams=1, features=FEATURES))
        assert isinstance(await self.receive(), p.Hello)   # its proof checked by the codec
        await self.send(p.Auth())

    def forge(self, event: p.Event, payload: bytes = b"") -> bytes:
        """``event``'s frame under this session's MAC and next sequence number, unchecked."""
        conn = self.conn
        frame = assemble(TYPE_CODES[type(event)], 0, conn._send_seq, encode_meta(event), payload, conn._out)
        conn._send_seq += 1
        return frame


@dataclass
class Target:
    bed: netns.Testbed
    receiver: Receiver
    token: bytes
    workdir: str
    nursery: trio.Nursery

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.receiver.address.rsplit(":", 1)
        return host, int(port)

    async def open(self) -> trio.SocketStream:
        return await netns.open_tcp_stream(*self.host_port, netns=self.bed.a.netns)

    async def peer(self) -> Peer:
        return Peer(await self.open(), self.token)

    async def attack(self, send_bytes: bytes) -> None:
        """Send raw bytes, then end the stream; the receiver may hang up on us first."""
        stream = await self.open()
        try:
            await stream.send_all(send_bytes)
            await stream.send_eof()
            with trio.move_on_after(5):
                while await stream.receive_some(65536):
                    pass
        except trio.BrokenResourceError:
            pass   # refused mid-way: what we want
        finally:
            await stream.aclose()

    async def refused(self, start: int, *needles: str) -> str:
        """The one line logged since line ``start``: a failure naming one of ``needles``."""
        line = await self.receiver.stderr.wait_for("failed", start=start, timeout=15)
        await trio.sleep(0.3)   # a second line would come right after the first
        failures = [x for x in self.receiver.stderr.lines[start:] if "failed" in x]
        assert failures == [line], failures
        assert any(n in line for n in needles), line
        return line

    async def still_serves(self) -> None:
        """A valid peer completes an authenticated handshake and declares a layout (the
        receiver starts a restore guest for it), then aborts."""
        start = len(self.receiver.stderr.lines)
        peer = await self.peer()
        with trio.fail_after(10):
            await peer.handshake()
            await peer.send(p.Layout(regions=(REGION,), page_size=PAGE, meta={}))
            await self.receiver.stderr.wait_for("receiving", start=start, timeout=10)
            await peer.send(p.Abort(reason="probe"))
        await peer.stream.aclose()
        await self.receiver.stderr.wait_for("probe", start=start, timeout=10)
        assert self.receiver.process.returncode is None

    def rss(self) -> int:
        return vm_rss(self.receiver.pid)

    async def no_restore_guest_left(self) -> None:
        guests = await trio.to_thread.run_sync(self.receiver.restore_guests)
        assert not guests, f"restore guests still alive: {guests}"


@asynccontextmanager
async def receiver_on(bed, sockdir):
    token_file = write_token(sockdir)
    with open(token_file, "rb") as f:
        token = f.read().strip()
    async with trio.open_nursery() as nursery:
        receiver = await start_receiver(nursery, bed, sockdir, token_file=token_file, once=False, idle_timeout=5)
        target = Target(bed, receiver, token, sockdir, nursery)
        with trio.fail_after(60):
            yield target
        nursery.cancel_scope.cancel()


async def test_random_bytes(bed, sockdir):
    async with receiver_on(bed, sockdir) as t:
        rss = t.rss()
        for seed in range(3):
            start = len(t.receiver.stderr.lines)
            await t.attack(os.urandom(JUNK) if seed else b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
            await t.refused(start, "bad magic")
        await t.still_serves()
        assert t.rss() - rss < RSS_SLACK


async def test_truncated_frames(bed, sockdir):
    async with receiver_on(bed, sockdir) as t:
        rss = t.rss()
        # a Hello cut short, before any authentication
        hello = p.Connection(p.Role.SOURCE, token=t.token).send(p.Hello(streams=1, features=FEATURES))
        for cut in (HEADER.size - 5, len(hello) - 3):
            start = len(t.receiver.stderr.lines)
            await t.attack(hello[:cut])
            await t.refused(start, "truncated frame")
        # an authenticated peer whose Layout frame ends half-way
        start = len(t.receiver.stderr.lines)
        peer = await t.peer()
        await peer.handshake()
        layout = peer.conn.send(p.Layout(regions=(REGION,), page_size=PAGE, meta={}))
        await peer.stream.send_all(layout[: len(layout) // 2])
        await peer.stream.send_eof()
        await t.refused(start, "truncated frame")
        await peer.stream.aclose()
        await t.still_serves()
        await t.no_restore_guest_left()
        assert t.rss() - rss < RSS_SLACK


async def test_pages_outside_the_layout(bed, sockdir):
    async with receiver_on(bed, sockdir) as t:
        rss = t.rss()
        outside = [
            ((REGION.start + REGION.length, 1),),            # the page right after the region
            ((REGION.start - PAGE, 1),),                     # the page right before it
            ((REGION.start + 15 * PAGE, 2),),                # a run that starts inside, ends outside
            ((0, 1),),                                       # the null page
        ]
        for runs in outside:
            start = len(t.receiver.stderr.lines)
            peer = await t.peer()
            await peer.handshake()
            await peer.send(p.Layout(regions=(REGION,), page_size=PAGE, meta={}))
            pages = sum(n for _, n in runs)
            frame = peer.forge(p.Pages(round=0, runs=runs, payload=bytes(pages * PAGE)), bytes(pages * PAGE))
            await peer.stream.send_all(frame)
            await t.refused(start, "outside layout")
            await peer.stream.aclose()
        await t.still_serves()
        await t.no_restore_guest_left()
        assert t.rss() - rss < RSS_SLACK


async def test_huge_lengths(bed, sockdir):
    async with receiver_on(bed, sockdir) as t:
        rss = t.rss()
        pages = TYPE_CODES[p.Pages]
        hello = TYPE_CODES[p.Hello]
        # before authentication nothing over 64 KiB is accepted, so a claimed 4 GiB frame is
        # refused at its header, however many bytes follow
        for type_code, meta_len, payload_len in ((hello, 0xFFFFFFFF, 0), (pages, 16, 0xFFFFFFFF), (hello, 70_000, 0)):
            start = len(t.receiver.stderr.lines)
            header = HEADER.pack(MAGIC, 1, type_code, 0, 0, meta_len, payload_len, 0)
            await t.attack(header + bytes(JUNK))
            await t.refused(start, "oversized frame", "payload")
        # after authentication the limit is max_frame (64 MiB): a 4 GiB claim is refused too
        start = len(t.receiver.stderr.lines)
        peer = await t.peer()
        await peer.handshake()
        await peer.send(p.Layout(regions=(REGION,), page_size=PAGE, meta={}))
        header = HEADER.pack(MAGIC, 1, pages, 0x02, 0, 0xFFFFFFF0, 0xFFFFFFF0, peer.conn._send_seq)
        try:
            await peer.stream.send_all(header + bytes(JUNK))
        except trio.BrokenResourceError:
            pass
        await t.refused(start, "oversized frame")
        await peer.stream.aclose()
        await t.still_serves()
        await t.no_restore_guest_left()
        assert t.rss() - rss < RSS_SLACK, f"receiver grew by {(t.rss() - rss) >> 20} MiB"


async def test_replayed_streams(bed, sockdir):
    """A recording of a real migration, replayed whole, fails at the handshake; a frame
    replayed inside a live session fails on its sequence number."""
    async with receiver_on(bed, sockdir) as t:
        control = os.path.join(sockdir, "src.sock")
        guest = await trio.to_thread.run_sync(functools.partial(
            spawn_guest_in, bed.a.netns, control, size=8 * MiB, dirty_rate=200, fill="random",
            extra_args=["--exit-with-parent"],
        ))
        try:
            proxy = FaultProxy(*t.host_port, Faults(), listen=(bed.b.address, 0), netns=bed.b.netns, record_limit=64 * MiB)
            await t.nursery.start(proxy.serve)
            to = proxy.address
            migrate = await start_migrate(t.nursery, bed, control, to, token_file=os.path.join(sockdir, "token"),
                                          extra=["--quiet"])
            assert await migrate.wait(60) == 0, migrate.stderr.lines
        finally:
            await trio.to_thread.run_sync(guest.kill)
        dest = await t.receiver.wait_report()
        assert dest["result"] == "resumed", "the receiver served a real migration"
        recording = bytes(proxy.recordings[0])
        assert len(recording) > 8 * MiB * 0.9
        rss = t.rss()

        start = len(t.receiver.stderr.lines)
        await t.attack(recording)
        await t.refused(start, "authentication failed")

        start = len(t.receiver.stderr.lines)
        peer = await t.peer()
        await peer.handshake()
        layout = peer.conn.send(p.Layout(regions=(REGION,), page_size=PAGE, meta={}))
        await peer.stream.send_all(layout + layout)
        await t.refused(start, "replayed frame")
        await peer.stream.aclose()

        await t.still_serves()
        assert t.rss() - rss < RSS_SLACK

        from migrator.guest.client import GuestClient

        def quit_destination() -> None:
            with GuestClient(dest["guest_control"]) as client:
                client.quit()

        await trio.to_thread.run_sync(quit_destination)

