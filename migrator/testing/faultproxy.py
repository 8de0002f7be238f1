"""A fault-injecting TCP proxy (trio) to put between a migrator and a receiver.

This kernel has no ``netem``, so delay, jitter, stalls, corruption and cuts come from here.
Faults apply to the client -> server direction (the migration stream); replies pass untouched
but for the delay. Every fault is given as a byte offset in the stream, so a test is repeatable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Faults:
    delay_s: float = 0.0          # added to every chunk, both directions
    jitter_s: float = 0.0         # uniform extra delay in [0, jitter_s]
    corrupt_at: int | None = None  # flip one bit of the byte at this offset
    cut_at: int | None = None     # close both sides once this many bytes went through
    stall_at: int | None = None   # stop forwarding (keep the connections open) at this offset
    seed: int = 0


class FaultProxy:
    """``port = await nursery.start(FaultProxy(target_host, target_port, faults).serve)``."""

    def __init__(self, host: str, port: int, faults: Faults = Faults()) -> None:
        self.target = (host, port)
        self.faults = faults
        self.connections = 0
        self.forwarded = 0
        self._rng = random.Random(faults.seed)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        task_status.started(port)
        await trio.serve_listeners(self._handle, listeners)

    async def _pause(self) -> None:
        f = self.faults
        if f.delay_s or f.jitter_s:
            await trio.sleep(f.delay_s + self._rng.uniform(0, f.jitter_s))

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        async with client, server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, True, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, False, nursery.cancel_scope)

    async def _pump(self, src, dst, faulty: bool, scope: trio.CancelScope) -> None:
        f = self.faults
        offset = 0
        try:
            while data := await src.receive_some(CHUNK):
                await self._pause()
                if faulty:
                    data, stop = self._apply(offset, bytearray(data))
                    offset += len(data)
                    self.forwarded += len(data)
                    if data:
                        await dst.send_all(data)
                    if stop == "cut":
                        scope.cancel()
                        return
                    if stop == "stall":
                        await trio.sleep_forever()
                else:
                    await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def _apply(self, offset: int, data: bytearray) -> tuple[bytearray, str | None]:
        f = self.faults
        end = offset + len(data)
        if f.corrupt_at is not None and offset <= f.corrupt_at < end:
            data[f.corrupt_at - offset] ^= 0x10
        for limit, kind in ((f.cut_at, "cut"), (f.stall_at, "stall")):
            if limit is not None and limit < end:
                return data[: max(0, limit - offset)], kind
        return data, None
