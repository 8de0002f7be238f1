"""Sessions over in-memory trio streams: the source via open_source, the destination via Acceptor."""

from __future__ import annotations

import os
import random

import trio
import trio.testing

from migrator.core.model import Region
from migrator.protocol import Layout, Pages, Zero
from migrator.transport import Acceptor, open_source

PS = 4096
TOKEN = b"transport-test-token-0123456789"
BASE = 0x7F0000000000
LAYOUT = Layout(regions=(Region(BASE, 4096 * PS),), meta={"id": "t"})


def page_batch(index: int, pages: int = 16, kind: str = "text") -> Pages:
    size = pages * PS
    if kind == "random":
        payload = random.Random(index).randbytes(size)
    elif kind == "zero":
        payload = bytes(size)
    elif kind == "half-zero":   # every other page zero: those travel as a bitmap (flag ZEROS)
        noise = random.Random(index).randbytes(size // 2)
        payload = b"".join(noise[p // 2 * PS : (p // 2 + 1) * PS] if p % 2 else bytes(PS) for p in range(pages))
    else:
        payload = (f"page batch {index} of some text-like data; ".encode() * size)[:size]
    return Pages(round=0, runs=((BASE + index * pages * PS, pages),), payload=payload)


def zero_batch(index: int) -> Zero:
    return Zero(round=0, runs=((BASE + (2048 + index) * PS, 1),))


async def memory_session(nursery, handler, *, token=None, streams=1, compress="zstd:1", bandwidth=None,
                         pair=trio.testing.memory_stream_pair):
    """Start a destination running ``handler`` and return the source's Channel."""
    acceptor = Acceptor(token=token)
    clients = []
    for _ in range(streams):
        client, server = pair()
        clients.append(client)
        nursery.start_soon(acceptor.handle, server, handler)
    return await open_source(clients, token=token, compress=compress, bandwidth=bandwidth, name="memory")


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
