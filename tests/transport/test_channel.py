"""Channel over in-memory trio streams: ordering, parallel streams, backpressure, failures, cap."""

import logging

import pytest
import trio
import trio.testing

from migrator.core.errors import LocalProtocolError, RemoteProtocolError, TransportError
from migrator.protocol import (
    Abort, Ack, Acked, Commit, Digest, DigestKind, Freeze, Layout, Pages, RoundEnd, Zero,
)
from migrator.transport import Acceptor, open_source

from .helpers import LAYOUT, PS, TOKEN, memory_session, page_batch, zero_batch


class Recorder:
    """A destination that records events and answers Digest and Commit like the engine does."""

    def __init__(self) -> None:
        self.events = []
        self.error = None
        self.done = trio.Event()

    async def __call__(self, channel) -> None:
        self.channel = channel
        try:
            while True:
                event = await channel.receive()
                self.events.append(event)
                if isinstance(event, Digest):
                    await channel.send(Ack(of=Acked.DIGEST, ok=True))
                    await channel.flush()
                elif isinstance(event, Commit):
                    await channel.send(Ack(of=Acked.COMMIT, ok=True))
                    await channel.flush()
                    return
        except (TransportError, RemoteProtocolError) as exc:
            self.error = exc
        finally:
            self.done.set()


async def migrate(channel, batches: int, kinds=("text", "random", "zero", "half-zero")) -> list:
    """A small migration: two rounds with barriers between them; returns what was sent."""
    sent = [LAYOUT]
    await channel.send(LAYOUT)
    for round_ in range(2):
        for i in range(batches):
            event = page_batch(i, kind=kinds[(i - i // 4 - 1) % len(kinds)]) if i % 4 else zero_batch(i)  # kinds in turn
            sent.append(event)
            await channel.send(event)
        sent.append(RoundEnd(round=round_, pages=batches))
        await channel.send(sent[-1])
    sent += [Freeze(round=2), Digest(kind=DigestKind.PAGES, value=b"d" * 16)]
    for event in sent[-2:]:
        await channel.send(event)
    await channel.flush()
    assert await channel.receive() == Ack(of=Acked.DIGEST, ok=True)
    sent.append(Commit())
    await channel.send(Commit())
    assert await channel.receive() == Ack(of=Acked.COMMIT, ok=True)
    return sent


def _key(event) -> tuple:
    payload = bytes(event.payload) if isinstance(event, Pages) else b""
    return type(event).__name__, event.round, event.runs, payload


def assert_barrier_order(sent: list, received: list) -> None:
    """Same events; data events may move only between the same two barriers."""

    def segments(events):
        out, current = [], []
        for event in events:
            if isinstance(event, (Pages, Zero)):
                current.append(event)
            else:
                out.append((sorted(map(_key, current)), event))
                current = []
        return out

    assert segments(received) == segments(sent)


@pytest.mark.parametrize("token", [None, TOKEN])
@pytest.mark.parametrize("streams", [1, 3])
async def test_session_round_trip_keeps_barrier_order(token, streams):
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            channel = await memory_session(nursery, recorder, token=token, streams=streams)
            async with channel:
                assert channel.streams == streams and channel.authenticated is (token is not None)
                sent = await migrate(channel, batches=24)
            await recorder.done.wait()
    assert recorder.error is None
    assert_barrier_order(sent, recorder.events)
    stats = channel.statistics()
    data = sum(len(e.payload) for e in sent if isinstance(e, Pages))
    assert stats.bytes_raw == data and stats.frames_sent >= len(sent)
    assert stats.bytes_wire < data   # text and zero pages compress
    dest = recorder.channel.statistics()
    assert dest.bytes_raw_received == data and dest.bytes_wire_received == stats.bytes_wire


async def test_parallel_streams_really_carry_pages():
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            channel = await memory_session(nursery, recorder, streams=2)
            async with channel:
                await migrate(channel, batches=16)
    links = channel._links
    assert all(link.conn.data_frames > 4 for link in links)


async def test_slow_receiver_backpressures_send():
    release = trio.Event()
    received = []
    sent = 0

    async def slow(channel):
        await release.wait()
        while True:
            event = await channel.receive()
            received.append(event)
            if isinstance(event, RoundEnd):
                return

    async def produce(channel):
        nonlocal sent
        await channel.send(LAYOUT)
        for i in range(60):
            await channel.send(page_batch(i, kind="random"))
            sent += 1
        await channel.send(RoundEnd(round=0))
        await channel.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            channel = await memory_session(nursery, slow, pair=trio.testing.lockstep_stream_pair, compress="none")
            nursery.start_soon(produce, channel)
            await trio.sleep(0.3)
            assert sent < 10, "send() kept accepting pages nobody read"
            release.set()
    assert sent == 60 and len(received) == 62   # Layout + 60 Pages + RoundEnd


async def test_flush_puts_everything_on_the_wire():
    got = []

    async def reader(channel):
        while True:
            got.append(await channel.receive())

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            channel = await memory_session(nursery, reader, streams=2)
            await channel.send(LAYOUT)
            for i in range(10):
                await channel.send(page_batch(i))
            await channel.flush()
            stats = channel.statistics()
            assert stats.frames_sent == 2 * 2 + 1 + 10   # Hello and Auth per stream, Layout, Pages
            await channel.send(RoundEnd(round=0))
            await channel.flush()
            while len(got) < 12:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert isinstance(got[-1], RoundEnd)


async def test_destination_abort_reaches_the_source_and_stops_its_sends():
    async def aborter(channel):
        await channel.receive()
        await channel.send(Abort(reason="no room for the guest"))
        await channel.flush()
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            channel = await memory_session(nursery, aborter)
            await channel.send(LAYOUT)
            assert await channel.receive() == Abort(reason="no room for the guest")
            with pytest.raises(LocalProtocolError, match="aborted"):
                await channel.send(page_batch(0))
            await channel.aclose()
            nursery.cancel_scope.cancel()


async def test_source_vanishing_mid_round_is_a_transport_error_at_the_destination():
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            channel = await memory_session(nursery, recorder)
            await channel.send(LAYOUT)
            await channel.send(page_batch(0))
            await channel.aclose()
            await recorder.done.wait()
    assert isinstance(recorder.error, TransportError)
    assert "closed the connection in state PRECOPY" in str(recorder.error)
    assert recorder.events == [LAYOUT, page_batch(0)]


async def test_corrupted_stream_raises_remote_protocol_error_at_receive():
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            channel = await memory_session(nursery, recorder, compress="none")
            await channel.send(LAYOUT)
            await channel.flush()
            link = channel._links[0]
            frame = bytearray(link.conn.send(page_batch(1)))
            frame[100] ^= 0xFF
            await link.stream.send_all(bytes(frame))
            await recorder.done.wait()
            await channel.aclose()
    assert isinstance(recorder.error, RemoteProtocolError)
    assert "payload of frame seq 3" in str(recorder.error) and "fails its checksum" in str(recorder.error)


async def test_bad_handshakes_are_logged_in_one_line(caplog):
    caplog.set_level(logging.WARNING, logger="migrator.transport")
    acceptor = Acceptor(token=TOKEN)
    called = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for junk in [b"GET / HTTP/1.1\r\n\r\n" * 4, b"MGRT\x01"]:
                client, server = trio.testing.memory_stream_pair()
                nursery.start_soon(acceptor.handle, server, called.append)
                await client.send_all(junk)
                await client.send_eof()
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(acceptor.handle, server, called.append)
            with pytest.raises(TransportError, match="closed during the handshake|closed the connection"):
                from migrator.transport import open_source

                await open_source([client], token=None)
    assert called == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    for words in ["bad magic", "truncated frame", "offers no authentication, but a token is required"]:
        assert sum(words in line for line in lines) == 1, (words, lines)


async def test_handshake_timeout(autojump_clock):
    acceptor = Acceptor(token=None, handshake_timeout=5)
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(60):
        await acceptor.handle(server, None)   # the client never speaks: logged, returns
    await client.aclose()


@pytest.mark.parametrize("rate", [4e6, 20e6])
async def test_bandwidth_cap_is_accurate_to_5_percent(autojump_clock, rate):
    async def sink(channel):
        while True:
            await channel.receive()

    async with trio.open_nursery() as nursery:
        channel = await memory_session(nursery, sink, compress="none", bandwidth=rate)
        await channel.send(LAYOUT)
        await channel.flush()
        before, wire = trio.current_time(), channel.statistics().bytes_wire
        for i in range(40):
            await channel.send(page_batch(i, pages=64, kind="random"))   # 40 x 256 KiB
        await channel.flush()
        elapsed = trio.current_time() - before
        sent = channel.statistics().bytes_wire - wire
        nursery.cancel_scope.cancel()
    assert abs(sent / elapsed - rate) / rate < 0.05, f"{sent / elapsed:.0f} B/s for a cap of {rate:.0f}"
    assert channel.statistics().throttle_seconds > 0


def test_layout_helper_is_a_layout():
    assert isinstance(LAYOUT, Layout) and LAYOUT.total_bytes == 4096 * PS


async def test_a_session_is_joinable_before_the_destination_answers_its_hello():
    """The source may open its parallel streams as soon as it reads the destination's Hello:
    the session must be registered by then, not after (a race seen under load)."""
    acceptor = Acceptor(token=None)
    registered_at_reply = []

    class Watching(trio.abc.Stream):
        def __init__(self, inner) -> None:
            self.inner = inner

        async def send_all(self, data) -> None:
            registered_at_reply.append(bool(acceptor._sessions))
            await self.inner.send_all(data)

        async def receive_some(self, max_bytes=None):
            return await self.inner.receive_some(max_bytes)

        async def wait_send_all_might_not_block(self) -> None:
            await self.inner.wait_send_all_might_not_block()

        async def send_eof(self) -> None:
            await self.inner.send_eof()

        async def aclose(self) -> None:
            await self.inner.aclose()

    done = trio.Event()

    async def handler(channel) -> None:
        done.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            clients = []
            for k in range(2):
                client, server = trio.testing.memory_stream_pair()
                clients.append(client)
                nursery.start_soon(acceptor.handle, Watching(server) if k == 0 else server, handler)
            channel = await open_source(clients, token=None)
            await done.wait()
            await channel.aclose()
    assert registered_at_reply[0] is True
