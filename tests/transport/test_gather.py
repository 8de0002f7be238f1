"""Large frames over real sockets land in pooled buffers of their own: no copy, safe reuse."""

import functools
import os
import socket

import pytest
import trio

from migrator.core.buffers import SizedBufferPool
from migrator.core.model import Region
from migrator.protocol import Ack, Acked, Digest, DigestKind, Layout, Pages, Zero
from migrator.transport import connect, serve
from migrator.transport._link import (
    GATHER_MIN, KEEPALIVE_IDLE, NOTSENT_LOWAT, USER_TIMEOUT_MS, _is_loopback, _tune_tcp,
)

PS = 4096
BASE = 0x7F0000000000
BATCH = 64                        # pages per event: 256 KiB, above GATHER_MIN
FRAMES = 48
LAYOUT = Layout(regions=(Region(BASE, FRAMES * BATCH * PS),), meta={"id": "gather"})


def batch(i: int) -> Pages:
    payload = os.urandom(BATCH * PS) if i % 2 else (b"text-like page %d " % i * BATCH * PS)[: BATCH * PS]
    return Pages(round=0, runs=((BASE + i * BATCH * PS, BATCH),), payload=payload)


class Destination:
    """Receives one round; keeps every payload (``keep``) or only a checksum of each."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.payloads: dict[int, object] = {}
        self.seen: dict[int, bytes] = {}
        self.stats = None
        self.done = trio.Event()

    async def __call__(self, channel) -> None:
        try:
            while True:
                event = await channel.receive()
                if isinstance(event, Pages):
                    index = (event.runs[0][0] - BASE) // (BATCH * PS)
                    self.seen[index] = bytes(event.payload[:64]) + bytes(event.payload[-64:])
                    if self.keep:
                        self.payloads[index] = event.payload
                elif isinstance(event, Digest):
                    self.stats = channel.statistics()
                    await channel.send(Ack(of=Acked.DIGEST, ok=True))
                    await channel.flush()
                    return
        finally:
            self.done.set()


async def send_round(address: str, events: list, *, streams: int = 1) -> None:
    channel = await connect(address, token=None, streams=streams, compress="zstd:1")
    async with channel:
        await channel.send(LAYOUT)
        for event in events:
            await channel.send(event)
            await channel.send(Zero(round=0, runs=((BASE, 1),)))   # small frames between
        await channel.send(Digest(kind=DigestKind.PAGES, value=b"d" * 16))
        assert await channel.receive() == Ack(of=Acked.DIGEST, ok=True)


@pytest.mark.parametrize("address", ["127.0.0.1:0", "unix"])
@pytest.mark.parametrize("keep", [False, True])
async def test_large_frames_are_gathered_and_kept_payloads_stay_intact(address, keep, sockdir):
    if address == "unix":
        address = f"unix:{os.path.join(sockdir, 'g.sock')}"
    events = [batch(i) for i in range(FRAMES)]
    destination = Destination(keep)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve, address, destination, token=None))
            await send_round(bound, events)
            await destination.done.wait()
            nursery.cancel_scope.cancel()
    stats = destination.stats
    # the random half goes raw (256 KiB frames); the text-like half shrinks below GATHER_MIN
    assert FRAMES // 2 - 1 <= stats.frames_gathered <= FRAMES // 2
    for i, event in enumerate(events):
        assert destination.seen[i] == bytes(event.payload[:64]) + bytes(event.payload[-64:])
    if keep:
        # kept payloads are never overwritten by a reused buffer
        assert all(destination.payloads[i] == event.payload for i, event in enumerate(events))
        raw = [destination.payloads[i] for i in range(1, FRAMES, 2)]          # random: sent raw
        assert all(p.readonly and type(p.obj) is bytearray for p in raw), "read-only views, not copies"
        assert len({id(p.obj) for p in raw}) == len(raw)
        assert stats.receive_buffers >= FRAMES // 2
    else:
        assert stats.receive_buffers <= 8, "buffers whose payloads were dropped are reused"


async def test_a_server_with_warmed_receive_buffers_allocates_none_for_a_session():
    events = [batch(i) for i in range(FRAMES)]
    destination = Destination(keep=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve, "127.0.0.1:0", destination, token=None,
                                                          receive_buffers=8))
            await send_round(bound, events)
            await destination.done.wait()
            nursery.cancel_scope.cancel()
    assert destination.stats.frames_gathered >= FRAMES // 2 - 1
    assert destination.stats.receive_buffers == 0, "every frame went into a buffer faulted in before the session"


async def test_parallel_streams_gather_too():
    events = [batch(i) for i in range(FRAMES)]
    destination = Destination(keep=True)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve, "127.0.0.1:0", destination, token=None))
            await send_round(bound, events, streams=2)
            await destination.done.wait()
            nursery.cancel_scope.cancel()
    assert FRAMES // 2 - 2 <= destination.stats.frames_gathered <= FRAMES // 2
    assert all(destination.payloads[i] == event.payload for i, event in enumerate(events))


def test_gather_threshold_covers_a_page_batch():
    assert GATHER_MIN <= BATCH * PS


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.0.9", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("fe80::1%lo", False),
])
def test_loopback_peers_are_recognised(host, loopback):
    assert _is_loopback(host) is loopback


def _allowed_congestion() -> str:
    try:
        with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.skipif("reno" not in _allowed_congestion().split(),
                    reason="kernel does not let unprivileged sockets choose reno (tcp_allowed_congestion_control)")
async def test_tcp_links_queue_whole_frames_use_reno_on_loopback_and_notice_dead_peers():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
    try:
        _tune_tcp(stream.socket)
        sock = stream.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0") == b"reno"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == USER_TIMEOUT_MS
    finally:
        await stream.aclose()
        await listeners[0].aclose()


def test_sized_pool_reuses_only_buffers_nobody_views():
    pool = SizedBufferPool(keep=2, granule=4096)
    first = pool.take(5000)
    assert len(first) == 5000 and len(first.obj) == 8192 and not first.readonly
    first_id = id(first.obj)               # (holding the buffer itself would keep it taken)
    kept = first[100:200].toreadonly()     # a consumer keeps a slice: the buffer stays taken
    del first
    second = pool.take(5000)
    assert id(second.obj) != first_id
    del kept
    third = pool.take(6000)                # fits the freed buffer again
    assert id(third.obj) == first_id and pool.allocated == 2
    del second, third
    assert pool.allocated == 2


def test_sized_pool_serves_from_the_smallest_free_buffer_that_holds_the_request():
    pool = SizedBufferPool(keep=3, granule=4096)
    big, small = pool.take(40000), pool.take(5000)
    big_id, small_id = id(big.obj), id(small.obj)
    del big, small
    assert id(pool.take(3000).obj) == small_id, "the smallest that fits"
    kept = pool.take(9000)                 # only the big one holds it, however much larger
    assert id(kept.obj) == big_id and pool.allocated == 2
    grown = pool.take(100000)              # nothing free fits: a new buffer
    assert len(grown.obj) == 102400 and pool.allocated == 3
    del grown
    assert id(pool.take(90000).obj) != small_id and pool.allocated == 3


def test_a_full_sized_pool_replaces_its_smallest_free_buffer():
    pool = SizedBufferPool(keep=2, granule=4096)
    a, b = pool.take(4096), pool.take(8192)
    a_id, b_id = id(a.obj), id(b.obj)
    del a, b
    assert pool.allocated == 2
    big = pool.take(65536)                 # too big for either: replaces the 4 KiB one
    assert pool.allocated == 3
    del big
    assert id(pool.take(8000).obj) == b_id
    assert id(pool.take(60000).obj) not in (a_id, b_id) and pool.allocated == 3
