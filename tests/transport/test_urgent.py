"""The urgent link (post-copy's requested pages): its frames overtake a backlog on the bulk link,
and still come before the next barrier."""

import functools

import pytest
import trio

from migrator.core.errors import TransportError
from migrator.core.model import Region
from migrator.protocol import Ack, Acked, Layout, Pages, RoundEnd
from migrator.transport import connect, serve

PS = 4096
BASE = 0x7F0000000000
BATCH = 64
BULK = 64                      # 16 MiB of pushed pages: more than the queues and socket buffers hold
LAYOUT = Layout(regions=(Region(BASE, (BULK + 1) * BATCH * PS),), meta={"id": "urgent"})


def pages(i: int, fill: int) -> Pages:
    return Pages(round=0, runs=((BASE + i * BATCH * PS, BATCH),), payload=bytes([fill]) * (BATCH * PS))


async def test_an_urgent_frame_overtakes_the_bulk_backlog_and_precedes_the_barrier():
    sent = trio.Event()
    order: list[str] = []

    async def destination(channel) -> None:
        assert isinstance(await channel.receive(), Layout)
        await sent.wait()                 # the bulk link is backed up: nobody read it meanwhile
        await trio.sleep(0.2)             # the urgent frame is read and delivered meanwhile
        while True:
            event = await channel.receive()
            if isinstance(event, Pages):
                order.append("urgent" if event.payload[0] == 0xEE else "bulk")
            elif isinstance(event, RoundEnd):
                order.append("barrier")
                await channel.send(Ack(of=Acked.ROUND, ok=True))
                await channel.flush()
                return

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(functools.partial(serve, "127.0.0.1:0", destination, token=None))
            channel = await connect(address, token=None, compress="none", urgent=True)
            async with channel:
                assert channel.streams == 2
                await channel.send(LAYOUT)
                await channel.flush()

                async def push() -> None:
                    for i in range(BULK):
                        await channel.send(pages(i, 0x11))

                async with trio.open_nursery() as inner:
                    inner.start_soon(push)
                    await trio.sleep(0.3)                     # the push is blocked on full buffers now
                    await channel.send(pages(BULK, 0xEE), urgent=True)
                    sent.set()
                await channel.send(RoundEnd(round=0, pages=(BULK + 1) * BATCH))
                assert await channel.receive() == Ack(of=Acked.ROUND, ok=True)
            nursery.cancel_scope.cancel()
    assert order.count("bulk") == BULK and order[-1] == "barrier"
    assert order.index("urgent") == 0, f"the urgent frame waited behind {order.index('urgent')} bulk frames"


async def test_only_a_channel_connected_for_it_sends_urgent_data_and_only_data():
    async def destination(channel) -> None:
        await channel.receive()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(functools.partial(serve, "127.0.0.1:0", destination, token=None))
            plain = await connect(address, token=None)
            async with plain:
                await plain.send(LAYOUT)
                with pytest.raises(TransportError, match="no urgent link"):
                    await plain.send(pages(0, 1), urgent=True)
            urgent = await connect(address, token=None, urgent=True)
            async with urgent:
                with pytest.raises(TransportError, match="only Pages and Zero"):
                    await urgent.send(LAYOUT, urgent=True)
            nursery.cancel_scope.cancel()


async def test_an_urgent_debit_goes_at_once_and_the_bulk_pays_for_it(autojump_clock):
    """Under --bandwidth an urgent frame never waits for the bucket, and the cap still holds:
    the next bulk frame waits for the bytes it let go."""
    from migrator.transport._limiter import TokenBucket

    bucket = TokenBucket(1e6, burst=1)
    start = trio.current_time()
    await bucket.consume(100_000)           # the first frame goes at once
    bucket.debit(500_000)                   # so does the urgent one
    assert trio.current_time() == start
    await bucket.consume(100_000)
    assert trio.current_time() - start == pytest.approx(0.6)
