"""TLSStream on its own, over a real socket pair: bytes intact at any read size, writers kept in
order, a clean close against a truncation."""

import os
import struct

import pytest
import trio

from migrator.transport._tls_stream import TLSStream


async def tls_pair(certs):
    a, b = trio.socket.socketpair()
    client = TLSStream(trio.SocketStream(a), certs.client(), server_hostname="127.0.0.1")
    server = TLSStream(trio.SocketStream(b), certs.server(), server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def read_exactly(stream: TLSStream, size: int, chunk: int) -> bytes:
    buffer, got = bytearray(size), 0
    while got < size:
        n = await stream.receive_into(memoryview(buffer)[got : got + chunk])
        assert n, f"the stream ended after {got} of {size} bytes"
        got += n
    return bytes(buffer)


@pytest.mark.parametrize("chunk", [1, 4093, 100_003, 8 << 20])
async def test_bytes_cross_intact_at_any_read_size(certs, chunk):
    data = os.urandom((1 << 20) + 17 if chunk > 1 else 70_000)
    with trio.fail_after(30):
        client, server = await tls_pair(certs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_parts, [data[:5], data[5:300_000], data[300_000:]])
            assert await read_exactly(server, len(data), chunk) == data
        await server.send_all(b"reply")
        assert await client.receive_some(3) == b"rep" and await client.receive_some() == b"ly"


async def test_concurrent_writers_keep_each_message_whole_and_in_order(certs):
    with trio.fail_after(30):
        client, server = await tls_pair(certs)

        async def writer(tag: int) -> None:
            for i in range(40):
                body = bytes([tag]) * (i * 997 + 1)
                await client.send_parts([struct.pack("<BII", tag, i, len(body)), body])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, 1)
            nursery.start_soon(writer, 2)
            seen = {1: 0, 2: 0}
            for _ in range(80):
                tag, i, size = struct.unpack("<BII", await read_exactly(server, 9, 9))
                assert i == seen[tag] and await read_exactly(server, size, 65536) == bytes([tag]) * size
                seen[tag] += 1


async def test_close_notify_ends_the_stream_and_a_bare_tcp_close_breaks_it(certs):
    with trio.fail_after(30):
        client, server = await tls_pair(certs)
        await client.aclose()
        assert await server.receive_into(bytearray(10)) == 0
        assert await server.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"late")

        client, server = await tls_pair(certs)
        await server.send_all(b"x")
        assert await client.receive_some() == b"x"     # and the server's session tickets
        await client.transport_stream.aclose()         # no close_notify: a truncation
        with pytest.raises(trio.BrokenResourceError, match="TLS"):
            await server.receive_some()


async def test_a_plain_peer_fails_the_handshake(certs):
    a, b = trio.socket.socketpair()
    server = TLSStream(trio.SocketStream(b), certs.server(), server_side=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.SocketStream(a).send_all, b"MGRT not a TLS client hello" * 10)
            with pytest.raises(trio.BrokenResourceError, match="TLS"):
                await server.do_handshake()
