"""A fault-injecting TCP proxy (trio) to put between a migrator and a receiver.

This kernel has no ``netem``, so delay, jitter, a rate cap, stalls, corruption and cuts come from
here. Delay and jitter form a delay line (chunks are stamped on arrival and sent when due, in
order), so a 2 ms delay adds latency without cutting throughput the way sleeping before every
forward would. Delay, jitter and the rate apply to both directions; the stream faults apply to the
client -> server direction (the migration stream) and are given as byte offsets in it, so a test
is repeatable. The proxy can also record what each client sent, for replay tests.

    proxy = FaultProxy("10.0.0.2", 7000, Faults(delay_s=0.002), listen=("10.0.0.2", 0), netns="mgtb-1-0-b")
    await nursery.start(proxy.serve)
    to = proxy.address                                  # "HOST:PORT" to give the migrator
"""

from __future__ import annotations

import random
import socket
import struct
from dataclasses import dataclass

import trio

from .netns import open_tcp_listener, open_tcp_stream

CHUNK = 64 * 1024
LINE_CHUNKS = 64          # chunks in flight in the delay line of one direction (4 MiB at most)
RATE_SLACK_S = 0.02       # how far behind its schedule the rate limiter may catch up (a burst)


@dataclass(frozen=True)
class Faults:
    delay_s: float = 0.0           # one-way latency added to every chunk, both directions
    jitter_s: float = 0.0          # extra per-chunk latency, uniform in [0, jitter_s]; order kept
    rate: float | None = None      # bytes/s cap of each direction, None = as fast as it goes
    corrupt_at: int | None = None  # flip bit 4 of the client's byte at this offset
    cut_at: int | None = None      # reset both connections once this many client bytes went through
    stall_at: int | None = None    # forward nothing after this many client bytes (connections stay open)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.jitter_s < 0 or (self.rate is not None and self.rate <= 0):
            raise ValueError("delay_s and jitter_s must be >= 0 and rate > 0")


@dataclass(frozen=True)
class ProxyStats:
    connections: int
    forwarded: int      # client -> server bytes delivered to the server, all connections
    corrupted: bool     # the corrupt_at byte went through
    stalled: bool       # a connection reached stall_at
    cut: bool           # a connection reached cut_at


class FaultProxy:
    """Forward connections on ``listen`` to ``host:port``; both sockets live in ``netns`` if given.

    ``record_limit`` > 0 keeps up to that many client bytes of each connection in
    ``recordings`` (as sent, before faults).
    """

    def __init__(
        self,
        host: str,
        port: int,
        faults: Faults = Faults(),
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        netns: str | None = None,
        record_limit: int = 0,
    ) -> None:
        self.target = (host, port)
        self.faults = faults
        self.listen = listen
        self.address = ""
        self.netns = netns
        self.record_limit = record_limit
        self.recordings: list[bytearray] = []
        self._rng = random.Random(faults.seed)
        self._connections = 0
        self._forwarded = 0
        self._corrupted = self._stalled = self._cut = False

    def statistics(self) -> ProxyStats:
        return ProxyStats(self._connections, self._forwarded, self._corrupted, self._stalled, self._cut)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled; reports the port through ``task_status`` (and sets
        ``address``, "HOST:PORT", to give a migrator)."""
        listener = open_tcp_listener(*self.listen, netns=self.netns)
        host, port = listener.socket.getsockname()[:2]
        self.address = f"{host}:{port}"
        task_status.started(port)
        await trio.serve_listeners(self._handle, [listener])

    # --- one connection ------------------------------------------------------------------------

    async def _handle(self, client: trio.SocketStream) -> None:
        self._connections += 1
        try:
            server = await open_tcp_stream(*self.target, netns=self.netns)
        except OSError:
            _reset(client)
            await client.aclose()
            return
        record = bytearray() if self.record_limit else None
        if record is not None:
            self.recordings.append(record)
        async with client, server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._direction, client, server, True, record, (client, server))
                nursery.start_soon(self._direction, server, client, False, None, (client, server))

    async def _direction(self, src, dst, faulty: bool, record: bytearray | None, both) -> None:
        """Read ``src`` into a delay line that a second task drains into ``dst``.

        A direction ends on its own, as on a real path: at ``src``'s end (passed on as an EOF
        once the line is drained), or when a side fails (``dst`` then gets an EOF). The other
        direction carries on, so what is already in flight, such as a receiver's Abort sent
        just before it hung up, still arrives.
        """
        send, receive = trio.open_memory_channel(LINE_CHUNKS)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain, receive, dst, faulty, both)
                async with send:
                    offset = 0
                    due = 0.0
                    while data := await src.receive_some(CHUNK):
                        if record is not None and len(record) < self.record_limit:
                            record += data[: self.record_limit - len(record)]
                        action = None
                        if faulty:
                            data, action = self._apply(offset, bytearray(data))
                            offset += len(data)
                        due = max(due, trio.current_time() + self._latency())
                        await send.send((data, due, action))
                        if action == "stall":
                            self._stalled = True
                            await trio.sleep_forever()
                        if action == "cut":
                            return
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            try:
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _drain(self, receive, dst, faulty: bool, both) -> None:
        rate = self.faults.rate
        free_at = trio.current_time()
        async with receive:
            async for data, due, action in receive:
                await trio.sleep_until(due)
                if data:
                    await dst.send_all(data)
                    if rate is not None:
                        # a virtual clock of the link: restarts only after an idle spell, so
                        # the time send_all itself took is not charged twice
                        free_at = max(free_at, trio.current_time() - RATE_SLACK_S) + len(data) / rate
                        await trio.sleep_until(free_at)
                    if faulty:
                        self._forwarded += len(data)
                if action == "cut":
                    self._cut = True
                    for stream in both:
                        _reset(stream)
                        await trio.aclose_forcefully(stream)
                    return
        try:
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _latency(self) -> float:
        f = self.faults
        return f.delay_s + (self._rng.uniform(0, f.jitter_s) if f.jitter_s else 0.0)

    def _apply(self, offset: int, data: bytearray) -> tuple[bytearray, str | None]:
        f = self.faults
        end = offset + len(data)
        if f.corrupt_at is not None and offset <= f.corrupt_at < end:
            data[f.corrupt_at - offset] ^= 0x10
            self._corrupted = True
        for limit, kind in ((f.cut_at, "cut"), (f.stall_at, "stall")):
            if limit is not None and limit < end:
                return data[: max(0, limit - offset)], kind
        return data, None


def _reset(stream: trio.SocketStream) -> None:
    """Make the coming close send RST instead of FIN (a connection torn, not ended)."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass

