"""Items applied a batch per worker-thread call, behind a bounded channel, with markers to wait on.

The destination's pre-copy apply and post-copy's installer both take what they are fed in
order, several items per ``trio.to_thread.run_sync`` call (each call is a cross-CPU hand-over),
and let the receive loop wait until everything handed over so far is done (``drained``): a
``trio.Event`` sent down the same channel is set once every item before it is applied. A batch
the caller calls small is applied on the event loop: a late round's few pages cost less than
the hand-over.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


async def apply_in_batches(queue: trio.MemoryReceiveChannel, batch_size: int, apply: Callable[[list], None], *,
                           small: Callable[[list], bool] = lambda batch: False) -> None:
    """Until ``queue`` closes: ``apply`` up to ``batch_size`` queued items per worker-thread
    call, and set each marker once the items before it are applied. A batch that is ``small``
    is applied on the event loop instead: the hand-over to a worker and back costs more than
    the work (each wake-up waits for a CPU while both are busy)."""
    async with queue:
        async for item in queue:
            if isinstance(item, trio.Event):
                item.set()
                continue
            batch, marker = [item], None
            while len(batch) < batch_size:
                try:
                    item = queue.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if isinstance(item, trio.Event):
                    marker = item
                    break
                batch.append(item)
            if small(batch):
                apply(batch)
                await trio.lowlevel.checkpoint()
            else:
                await trio.to_thread.run_sync(apply, batch)
            if marker is not None:
                marker.set()


async def drained(queue: trio.MemorySendChannel) -> None:
    """Wait until every item sent down ``queue`` so far is applied."""
    done = trio.Event()
    await queue.send(done)
    await done.wait()
