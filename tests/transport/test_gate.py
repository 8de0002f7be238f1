"""The receiver's door (``_gate``): whom a connection counts against, and the caps in-process
over real sockets: a unix-socket peer counts by its uid, an IPv4-mapped IPv6 peer as IPv4."""

from __future__ import annotations

import functools
import os
import socket

import pytest
import trio

from migrator.core.errors import TransportError
from migrator.transport import HandshakeLimits, connect, serve
from migrator.transport._gate import peer_key

from .helpers import TOKEN


def test_limits_are_whole_numbers_of_at_least_one():
    for bad in ({"total": 0}, {"per_peer": -1}, {"total": 2.5}):
        with pytest.raises(TransportError, match="handshake limit"):
            HandshakeLimits(**bad)


def test_peer_keys():
    with socket.socket(socket.AF_INET6) as listener:
        try:
            listener.bind(("::", 0))
        except OSError:
            pytest.skip("no IPv6 on this machine's loopback")
        listener.listen()
        with socket.create_connection(("127.0.0.1", listener.getsockname()[1])):
            accepted, _ = listener.accept()
            with accepted:
                assert peer_key(accepted) == "127.0.0.1"     # seen as ::ffff:127.0.0.1
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen()
        with socket.create_connection(("::1", listener.getsockname()[1])):
            accepted, _ = listener.accept()
            with accepted:
                assert peer_key(accepted) == "::/64"          # an IPv6 peer counts by its /64
    left, right = socket.socketpair()
    with left, right:
        assert peer_key(left) == f"unix uid {os.geteuid()}"


async def test_a_unix_peer_past_its_cap_closes_its_oldest_waiting_connection(sockdir):
    path = os.path.join(sockdir, "r.sock")

    async def session(channel) -> None:
        await channel.receive()    # the source's end of it
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, f"unix:{path}", session, token=TOKEN,
                                                  limits=HandshakeLimits(total=8, per_peer=2)))
            idle = [await trio.open_unix_socket(path) for _ in range(3)]
            channel = await connect(f"unix:{path}", token=TOKEN)   # the third closed the first, this the second
            await channel.aclose()
            ends = []
            for stream in idle:
                with trio.move_on_after(0.5):
                    ends.append(await stream.receive_some(1))
                    continue
                ends.append(None)   # still open, silent
            assert ends == [b"", b"", None]
            for stream in idle:
                await stream.aclose()
            nursery.cancel_scope.cancel()
