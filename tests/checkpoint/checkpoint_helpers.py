"""Shared helpers of the checkpoint tests: replaying an image chain into plain bytes."""

from __future__ import annotations

import trio

from migrator import protocol as p
from migrator.checkpoint import load_chain
from migrator.guest.layout import region_digest
from migrator.transport import open_file_reader

MiB = 1 << 20


async def replay_digest(image_dir: str) -> str:
    """The region digest (hex) of the memory the chain base..image_dir records, rebuilt independently of
    the restore path: the guest's ``digest`` of the same bytes must equal it."""
    chain = load_chain(image_dir)
    region = chain[0].regions[0]
    memory = bytearray(region.length)
    for image in chain:
        async with await open_file_reader(image.stream, token=None) as reader:
            async for event in reader:
                if type(event) in (p.Pages, p.Zero):
                    view = memoryview(event.payload) if type(event) is p.Pages else None
                    offset = 0
                    for address, count in event.runs:
                        size = count * image.page_size
                        start = address - region.start
                        memory[start : start + size] = view[offset : offset + size] if view is not None else bytes(size)
                        offset += size
    return await trio.to_thread.run_sync(lambda: region_digest(memory))
