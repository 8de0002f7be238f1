"""connect/serve over real loopback TCP and unix sockets."""

import functools
import logging
import os
import socket

import pytest
import trio

from migrator.core.errors import RemoteProtocolError, TransportError
from migrator.protocol import (
    NEED_DATA, PROTOCOL_VERSION, Ack, Acked, Connection, ConnectionClosed, Digest, DigestKind, Hello, Role, RoundEnd,
)
from migrator.transport import connect, parse_address, serve
from migrator.transport.net import needs_no_mac

from .helpers import LAYOUT, TOKEN, page_batch, zero_batch
from .test_channel import Recorder, assert_barrier_order, migrate


def drain(conn: Connection) -> list:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if type(event) is ConnectionClosed:
            return events
    return events


async def start_server(nursery, handler, address="127.0.0.1:0", token=None):
    return await nursery.start(functools.partial(serve, address, handler, token=token))


@pytest.mark.parametrize("streams, token", [(1, None), (2, TOKEN), (3, None)])
async def test_tcp_session(streams, token):
    recorder = Recorder()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, recorder, token=token)
            assert address.startswith("127.0.0.1:") and not address.endswith(":0")
            channel = await connect(f"tcp:{address}", token=token, streams=streams)
            sent = await migrate(channel, batches=40)
            await channel.aclose()
            await recorder.done.wait()
            nursery.cancel_scope.cancel()
    assert recorder.error is None
    assert_barrier_order(sent, recorder.events)
    assert channel.peer.auth is (token is not None)
    # between loopback addresses the token is proven, and frames need only checksums
    assert channel.authenticated is recorder.channel.authenticated is (token is not None)
    assert not channel.frame_macs and not recorder.channel.frame_macs


@pytest.mark.parametrize("side", ["source", "destination"])
async def test_either_end_can_insist_on_macs_over_loopback(side):
    """A relay in clear behind two loopback ends looks like loopback to both: ``frame_macs`` on
    one end keeps the MACs for the whole session."""
    recorder = Recorder()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(functools.partial(serve, "127.0.0.1:0", recorder, token=TOKEN,
                                                            frame_macs=side == "destination"))
            channel = await connect(f"tcp:{address}", token=TOKEN, frame_macs=side == "source")
            sent = await migrate(channel, batches=4)
            await channel.aclose()
            await recorder.done.wait()
            nursery.cancel_scope.cancel()
    assert_barrier_order(sent, recorder.events)
    assert channel.frame_macs and recorder.channel.frame_macs


@pytest.mark.parametrize(("family", "local", "peer", "protected"), [
    (socket.AF_UNIX, "", "", True),
    (socket.AF_INET, ("127.0.0.1", 5000), ("127.0.0.2", 7000), True),
    (socket.AF_INET6, ("::1", 5000, 0, 0), ("::1", 7000, 0, 0), True),
    (socket.AF_INET, ("10.0.0.1", 5000), ("10.0.0.2", 7000), False),
    (socket.AF_INET, ("127.0.0.1", 5000), ("10.0.0.2", 7000), False),
    (socket.AF_INET6, ("fe80::1%eth0", 5000, 0, 2), ("fe80::2%eth0", 7000, 0, 2), False),
    (socket.AF_INET6, ("::ffff:10.0.0.1", 5000, 0, 0), ("::1", 7000, 0, 0), False),
    (socket.AF_PACKET, ("eth0", 0), ("eth0", 0), False),
])
def test_only_a_link_nobody_but_root_can_write_into_goes_without_macs(family, local, peer, protected):
    assert needs_no_mac(family, local, peer) is protected


async def test_unix_socket_session(sockdir):
    path = os.path.join(sockdir, "dest.sock")
    recorder = Recorder()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, recorder, address=f"unix:{path}")
            assert address == f"unix:{path}"
            channel = await connect(address, token=None, streams=2, compress="zstd:-1")
            sent = await migrate(channel, batches=12)
            await channel.aclose()
            await recorder.done.wait()
            nursery.cancel_scope.cancel()
    assert_barrier_order(sent, recorder.events)
    assert not os.path.exists(path), "the server removes its socket file"


async def test_server_survives_bad_clients_and_logs_one_line_each(caplog):
    caplog.set_level(logging.WARNING, logger="migrator.transport")
    recorder = Recorder()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, recorder, token=TOKEN)
            host, port = address.rsplit(":", 1)
            junk = trio.socket.socket()
            await junk.connect((host, int(port)))
            await junk.send(b"\x16\x03\x01 not a migrator stream")
            junk.close()
            with pytest.raises(RemoteProtocolError, match="the destination does not know the token"):
                await connect(address, token=b"a-wrong-token-of-enough-bytes")
            with pytest.raises(TransportError, match="closed"):
                await connect(address, token=None)
            # a good client is still served
            channel = await connect(address, token=TOKEN)
            await migrate(channel, batches=4)
            await channel.aclose()
            await recorder.done.wait()
            nursery.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert all("\n" not in m and m.startswith("connection from 127.0.0.1:") for m in messages)
    assert any("bad magic" in m for m in messages)
    assert any("offers no authentication" in m for m in messages)
    assert recorder.error is None


async def test_peers_of_another_protocol_version_are_told_in_one_line(caplog):
    """A version-1 source gets this destination's Hello before the connection closes: it checks a
    Hello's version first, so it reports the two versions rather than a dropped Hello (checked
    against the version-1 code). A destination that drops our Hello, as a version-1 one does,
    gets a line that names the version as a possible cause."""
    caplog.set_level(logging.WARNING, logger="migrator.transport")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, Recorder())
            host, port = address.rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            old = Connection(Role.SOURCE)
            await stream.send_all(old.send(Hello(version=1)))
            while data := await stream.receive_some():
                old.receive_data(data)
            old.receive_data(b"")
            reply, closed = drain(old)
            assert type(reply) is Hello and reply.version == PROTOCOL_VERSION == 2 and not reply.proof
            assert closed == ConnectionClosed(expected=False)

            async def drops_the_hello(stream):
                await stream.receive_some()
                await stream.aclose()

            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, drops_the_hello, listeners)
            dropping = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            with pytest.raises(TransportError, match="or does it speak a protocol version older than 2\\?\\)$"):
                await connect(dropping, token=None)
            nursery.cancel_scope.cancel()
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("connection from 127.0.0.1:") and "\n" not in message
    assert message.endswith("RemoteProtocolError: peer speaks protocol version 1; this side speaks 2 "
                            "(run the same migrator version on both sides)")


async def test_refuses_to_listen_publicly_without_a_token():
    with pytest.raises(TransportError, match="refusing to listen on 0.0.0.0:0 without a token"):
        await serve("0.0.0.0:0", None, token=None)


async def test_connect_errors_are_transport_errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # bound, not listening: connection refused
        with pytest.raises(TransportError, match=f"cannot connect to 127.0.0.1:{port}"):
            await connect(f"127.0.0.1:{port}", token=None)
    with pytest.raises(TransportError, match="bad address"):
        await connect("no-port-here", token=None)
    with pytest.raises(TransportError, match="streams must be 1..64"):
        await connect("127.0.0.1:1", token=None, streams=0)


async def test_receiver_dying_mid_stream_fails_the_senders_calls():
    async def dies(channel):
        await channel.receive()
        raise TransportError("receiver crashed")   # logged by serve; the connection closes

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, dies)
            channel = await connect(address, token=None, compress="none")
            await channel.send(LAYOUT)
            with pytest.raises(TransportError, match="write failed|closed"):
                for i in range(2000):
                    await channel.send(page_batch(i % 200, pages=64, kind="random"))
                await channel.flush()
            with pytest.raises(TransportError):
                await channel.send(zero_batch(0))
            await channel.aclose()
            nursery.cancel_scope.cancel()


async def test_destination_sees_source_ack_flow_with_digest_from_both_sides():
    async def answer(channel):
        while True:
            event = await channel.receive()
            if isinstance(event, Digest):
                await channel.send(Digest(kind=DigestKind.PAGES, value=b"mine"))
                await channel.send(Ack(of=Acked.DIGEST, ok=False, reason="differs"))
                await channel.flush()
                return

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, answer)
            async with await connect(address, token=None) as channel:
                await channel.send(LAYOUT)
                await channel.send(page_batch(1))
                await channel.send(RoundEnd(round=0))
                await channel.send(Digest(kind=DigestKind.PAGES, value=b"yours"))
                assert await channel.receive() == Digest(kind=DigestKind.PAGES, value=b"mine")
                assert await channel.receive() == Ack(of=Acked.DIGEST, ok=False, reason="differs")
                with pytest.raises(TransportError, match="closed the connection in state PRECOPY"):
                    await channel.receive()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "text, kind, host, port, loopback",
    [
        ("127.0.0.1:7000", "tcp", "127.0.0.1", 7000, True),
        ("tcp:localhost:1", "tcp", "localhost", 1, True),
        ("[::1]:9", "tcp", "::1", 9, True),
        ("10.0.0.5:22", "tcp", "10.0.0.5", 22, False),
        ("example.org:80", "tcp", "example.org", 80, False),
    ],
)
def test_parse_address(text, kind, host, port, loopback):
    address = parse_address(text)
    assert (address.kind, address.host, address.port, address.is_loopback) == (kind, host, port, loopback)
    assert parse_address(str(address)) == address


def test_parse_unix_address_and_errors():
    assert parse_address("unix:/run/x.sock").path == "/run/x.sock"
    for bad in ["", "unix:", "host", "host:port", "1.2.3.4:70000"]:
        with pytest.raises(TransportError, match="bad address"):
            parse_address(bad)
