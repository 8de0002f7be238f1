"""Raw Pages payloads over real sockets received straight into their pages' places."""

import functools
import os

import pytest
import trio

from migrator.core.model import Region
from migrator.protocol import (CHECKSUM_FRAMES, NEED_DATA, Ack, Acked, Auth, Connection, Digest, DigestKind, Hello, Layout,
                               Pages, PlacedPages, Role, Zero)
from migrator.transport import connect, serve
from migrator.transport.net import FEATURES

from .helpers import TOKEN

PS = 4096
BASE = 0x7F0000000000
PAGES = 2048
LAYOUT = Layout(regions=(Region(BASE, PAGES * PS),), meta={"id": "place"})


class Placement:
    def __init__(self, views) -> None:
        self.payload = views


class Target:
    """A placement the link fills through ``receive``, as the destination's native one does:
    here one non-blocking ``readv`` over the runs' places from ``offset`` on, in Python."""

    def __init__(self, views) -> None:
        self.views = views
        self.nbytes = sum(v.nbytes for v in views)
        self.payload = (self,)
        self.receives = 0

    def _rest(self, offset: int) -> list[memoryview]:
        rest = []
        for view in self.views:
            if offset >= view.nbytes:
                offset -= view.nbytes
                continue
            rest.append(view[offset:])
            offset = 0
        return rest

    def receive(self, fd: int, offset: int) -> int | None:
        try:
            n = os.readv(fd, self._rest(offset)[:1024])
        except BlockingIOError:
            return None
        self.receives += 1
        return n

    def copy_in(self, offset: int, data) -> None:
        for view in self._rest(offset):
            n = min(view.nbytes, data.nbytes)
            view[:n], data = data[:n], data[n:]
            if not data.nbytes:
                return


class Memory:
    """The destination's pages (a bytearray standing in for a guest's mapping) and a placer
    that takes frames of at most ``max_runs`` runs, or any frame as a ``Target`` where the link
    can receive natively."""

    def __init__(self, max_runs: int = 8) -> None:
        self.bytes = bytearray(PAGES * PS)
        self.max_runs = max_runs
        self.placements: list[Placement | Target] = []
        self.native: list[bool] = []

    def place(self, incoming, native: bool = False) -> Placement | Target | None:
        self.native.append(native)
        view = memoryview(self.bytes)
        views = [view[(a - BASE) : (a - BASE) + n * PS] for a, n in incoming.runs]
        if native:
            placement = Target(views)
        elif len(incoming.runs) > self.max_runs:
            return None
        else:
            placement = Placement(views)
        self.placements.append(placement)
        return placement


class Destination:
    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.events: list = []
        self.stats = None

    async def __call__(self, channel) -> None:
        channel.place_pages(self.memory.place)
        while True:
            event = await channel.receive()
            if isinstance(event, Pages):     # not placed: written here
                offset = 0
                for address, count in event.runs:
                    self.memory.bytes[address - BASE : address - BASE + count * PS] = event.payload[offset : offset + count * PS]
                    offset += count * PS
            if not isinstance(event, Layout):
                self.events.append(event)
            if isinstance(event, Digest):
                self.stats = channel.statistics()
                await channel.send(Ack(of=Acked.DIGEST, ok=True))
                await channel.flush()
                return


def scattered(first: int, count: int, step: int) -> tuple:
    return tuple((BASE + (first + k * step) * PS, 1) for k in range(count))


async def migrate(address: str, events: list, token=None, **connect_options) -> None:
    channel = await connect(address, token=token, compress="none", **connect_options)
    async with channel:
        await channel.send(LAYOUT)
        for event in events:
            await channel.send(event)
        await channel.send(Digest(kind=DigestKind.PAGES, value=b"d" * 16))
        assert await channel.receive() == Ack(of=Acked.DIGEST, ok=True)


def expected(events: list) -> bytearray:
    memory = bytearray(PAGES * PS)
    for event in events:
        if isinstance(event, Pages):
            offset = 0
            for address, count in event.runs:
                memory[address - BASE : address - BASE + count * PS] = event.payload[offset : offset + count * PS]
                offset += count * PS
    return memory


@pytest.mark.parametrize("address", ["127.0.0.1:0", "unix"])
async def test_raw_pages_land_in_place_and_the_rest_as_usual(address, sockdir):
    if address == "unix":
        address = f"unix:{os.path.join(sockdir, 'p.sock')}"
    events = [
        Pages(round=0, runs=((BASE, 512),), payload=os.urandom(512 * PS)),              # one run: placed
        Zero(round=0, runs=((BASE + 512 * PS, 1),)),
        Pages(round=0, runs=scattered(600, 8, 3), payload=os.urandom(8 * PS)),  # small frame: below GATHER_MIN
        Pages(round=0, runs=scattered(700, 64, 2), payload=os.urandom(64 * PS)),        # 64 runs: the placer refuses it
        Pages(round=1, runs=((BASE + 1024 * PS, 256), (BASE + 1400 * PS, 300)), payload=os.urandom(556 * PS)),  # placed
        Pages(round=1, runs=((BASE + 100 * PS, 64),), payload=b"t" * 64 * PS),          # 256 KiB, placed
    ]
    memory = Memory()
    destination = Destination(memory)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve, address, destination, token=None))
            await migrate(bound, events)
            nursery.cancel_scope.cancel()
    kinds = [type(e).__name__ for e in destination.events]
    assert kinds == ["PlacedPages", "Zero", "Pages", "Pages", "PlacedPages", "PlacedPages", "Digest"]
    assert destination.stats.frames_placed == 3
    assert memory.bytes == expected(events), "every placed page lies where its run says"
    placed = [e for e in destination.events if isinstance(e, PlacedPages)]
    assert [p.runs for p in placed] == [events[0].runs, events[4].runs, events[5].runs]
    assert [p.owner for p in placed] == memory.placements
    assert not any(memory.native), "a session whose payloads carry tags is placed through views"


@pytest.mark.parametrize("address", ["127.0.0.1:0", "unix"])
async def test_an_untagged_socket_session_places_every_raw_frame_through_its_target(address, sockdir):
    """Authenticated loopback and unix sockets carry no payload tags: the link hands the whole
    payload to the placement's ``receive``, a scattered batch of a run per page included."""
    if address == "unix":
        address = f"unix:{os.path.join(sockdir, 'p.sock')}"
    events = [
        Pages(round=0, runs=((BASE, 512),), payload=os.urandom(512 * PS)),
        Pages(round=1, runs=scattered(513, 700, 2), payload=os.urandom(700 * PS)),     # 700 runs
        Zero(round=1, runs=((BASE + 2000 * PS, 1),)),
        Pages(round=1, runs=((BASE + 1900 * PS, 64),), payload=os.urandom(64 * PS)),
    ]
    memory = Memory()
    destination = Destination(memory)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve, address, destination, token=TOKEN))
            await migrate(bound, events, token=TOKEN)
            nursery.cancel_scope.cancel()
    kinds = [type(e).__name__ for e in destination.events]
    assert kinds == ["PlacedPages", "PlacedPages", "Zero", "PlacedPages", "Digest"]
    assert memory.native == [True, True, True]
    assert all(type(p) is Target and p.receives for p in memory.placements)
    assert destination.stats.frames_placed == 3
    assert memory.bytes == expected(events), "every page lies where its run says"


async def test_placed_frames_over_tls(certs):
    events = [Pages(round=0, runs=((BASE + k * 256 * PS, 256),), payload=os.urandom(256 * PS)) for k in range(8)]
    memory = Memory()
    destination = Destination(memory)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve, "127.0.0.1:0", destination, token=None,
                                                          tls=certs.server()))
            await migrate(bound, events, tls=certs.client())
            nursery.cancel_scope.cancel()
    assert destination.stats.frames_placed == 8
    assert memory.bytes == expected(events)


async def test_parallel_streams_place_their_frames_too():
    events = [Pages(round=0, runs=((BASE + k * 128 * PS, 128),), payload=os.urandom(128 * PS)) for k in range(16)]
    memory = Memory()
    destination = Destination(memory)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve, "127.0.0.1:0", destination, token=None))
            await migrate(bound, events, streams=2)
            nursery.cancel_scope.cancel()
    assert destination.stats.frames_placed == 16
    assert memory.bytes == expected(events)


async def test_a_placed_scattered_frame_cut_mid_payload_fails_the_session_as_truncated():
    """A source that ends a scattered batch half-way, on a session the link places natively: the
    receive reports a truncated frame, and only the pages the bytes reached were written."""
    memory = Memory()
    failures: list[Exception] = []

    async def destination(channel) -> None:
        channel.place_pages(memory.place)
        try:
            while True:
                await channel.receive()
        except Exception as exc:      # what the session ends with
            failures.append(exc)

    runs = scattered(0, 200, 2)
    payload = os.urandom(200 * PS)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve, "127.0.0.1:0", destination, token=TOKEN))
            host, port = bound.rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            conn = Connection(Role.SOURCE, token=TOKEN)
            await stream.send_all(conn.send(Hello(streams=1, features=(*FEATURES, CHECKSUM_FRAMES))))
            while (event := conn.next_event()) is NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            assert isinstance(event, Hello)
            await stream.send_all(conn.send(Auth()))
            assert conn.untagged, "an authenticated loopback session carries no payload tags"
            await stream.send_all(conn.send(LAYOUT))
            frame = conn.send(Pages(round=0, runs=runs, payload=payload))
            await stream.send_all(frame[: len(frame) - 100 * PS])
            await stream.send_eof()
            while not failures:
                await trio.sleep(0.01)
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert "truncated frame" in str(failures[0])
    assert memory.native == [True] and memory.placements[0].receives
    landed = [memory.bytes[a - BASE : a - BASE + PS] for a, _ in runs]
    assert landed[:99] == [payload[k * PS : (k + 1) * PS] for k in range(99)]
    assert landed[101:] == [bytes(PS)] * 99, "nothing past the bytes that came"
