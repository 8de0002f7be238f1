"""Continuous checkpointing into a chain, and pruning by merging the oldest image into its child.

``ChainDir`` is a directory of images named ``000001``, ``000002`` … each the child of the one
before. ``merge_into_child`` makes the child self-contained: its new stream holds the base's
pages that the child does not overwrite (round 0, with the base's Zero ranges) followed by the
child's own (round 1), and the child's unchanged digest table and pages digest (the memory as of
the child is the same). It is written under a new file name, then ``image.json`` is replaced
atomically; only then are the child's old stream and the base removed, so a crash at any point
leaves a restorable chain (at worst with an unreferenced file).
"""

from __future__ import annotations

import bisect
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

import trio

from .. import protocol as p
from ..core.errors import ImageError
from ..core.model import Run
from ..core.runs import count_pages, union
from ..transport import open_file_reader, open_file_writer
from .engine import CheckpointSettings, take_checkpoint
from .image import ImageInfo, chain_images, read_image, write_manifest

NAME_WIDTH = 6


def subtract(runs: tuple[Run, ...], covered: list[Run], starts: list[int], page_size: int) -> list[tuple[Run, int]]:
    """Pieces of ``runs`` not in sorted, coalesced ``covered`` (``starts``: its addresses), each
    as ((address, pages), page offset into the runs' concatenated payload)."""
    out: list[tuple[Run, int]] = []
    offset = 0
    for address, count in runs:
        end = address + count * page_size
        cursor = address
        i = max(bisect.bisect_right(starts, address) - 1, 0)
        while cursor < end and i < len(covered):
            c_start, c_end = covered[i][0], covered[i][0] + covered[i][1] * page_size
            if c_end <= cursor:
                i += 1
                continue
            if c_start >= end:
                break
            if c_start > cursor:
                out.append(((cursor, (c_start - cursor) // page_size), offset + (cursor - address) // page_size))
            cursor = max(cursor, c_end)
            i += 1
        if cursor < end:
            out.append(((cursor, (end - cursor) // page_size), offset + (cursor - address) // page_size))
        offset += count
    return out


async def _events(image: ImageInfo, token: bytes | None):
    async with await open_file_reader(image.stream, token=token) as reader:
        async for event in reader:
            yield event


async def merge_into_child(base: ImageInfo, child: ImageInfo, *, token: bytes | None = None,
                           compress: str = "zstd:1") -> ImageInfo:
    """Rewrite ``child`` as a full image holding base + child; then delete ``base``."""
    if base.kind != "full" or child.parent_id != base.id:
        raise ImageError(f"{child.path}: can only merge a full parent into its child")
    ps = child.page_size
    touched: list[Run] = []
    async for event in _events(child, token):
        if type(event) in (p.Pages, p.Zero):
            touched.extend(event.runs)
    covered = union([], touched, ps)
    starts = [address for address, _ in covered]
    name = f"stream-{uuid.uuid4().hex[:12]}.mgrt"
    async with await open_file_writer(os.path.join(child.path, name), token=token, compress=compress) as writer:
        meta = {"id": child.id, "image": True, "kind": "full", "parent": "", "merged": base.id}
        await writer.send(p.Layout(regions=child.regions, page_size=ps, meta=meta))
        shift = 0           # the child's rounds follow the base's: only the base's round 0 stays round 0
        written: list[Run] = []
        zeroed: list[Run] = []
        emitted = [0]       # pages of the image being merged, for its RoundEnd

        async def emit(event: p.Pages | p.Zero) -> None:
            (written if type(event) is p.Pages else zeroed).extend(event.runs)
            emitted[0] += event.pages
            await writer.send(event)

        for image in (base, child):
            last = shift
            emitted[0] = 0
            async for event in _events(image, token):
                kind = type(event)
                if kind is p.Zero or kind is p.Pages:
                    number = event.round + shift
                    last = max(last, number)
                    if image is child:
                        await emit(p.Pages(round=number, runs=event.runs, payload=event.payload)
                                   if kind is p.Pages else p.Zero(round=number, runs=event.runs))
                        continue
                    pieces = subtract(event.runs, covered, starts, ps)      # pages the child rewrites are dropped
                    if not pieces:
                        continue
                    runs = tuple(run for run, _ in pieces)
                    if kind is p.Zero:
                        await emit(p.Zero(round=number, runs=runs))
                    else:
                        view = memoryview(event.payload)
                        payload = b"".join(view[first * ps:(first + n) * ps] for (_, n), first in pieces)
                        await emit(p.Pages(round=number, runs=runs, payload=payload))
                elif kind is p.Digest and image is child:
                    await writer.send(event)
            # one pre-copy round per merged image (no Freeze in a merged stream, so no final round)
            await writer.send(p.RoundEnd(round=last, pages=emitted[0]))
            shift = last + 1
    doc = dict(child.manifest)
    size = os.stat(os.path.join(child.path, name)).st_size
    raw = writer.statistics().bytes_raw
    pages = dict(doc.get("pages") or {})
    pages.update(sent=raw // ps, unique=count_pages(union([], written, ps)),
                 zero=count_pages(union([], zeroed, ps)))
    doc.update(kind="full", parent=None, stream={"file": name, "bytes": size}, bytes_stored=size, bytes_raw=raw,
               ratio=round(raw / size, 3) if size else 0.0, pages=pages,
               merged=[*base.manifest.get("merged", []), {"id": base.id, "merged_at": time.time()},
                       *child.manifest.get("merged", [])])
    await trio.to_thread.run_sync(write_manifest, child.path, doc)
    if os.path.basename(child.stream) != name:
        os.unlink(child.stream)
    shutil.rmtree(base.path)
    return read_image(child.path)


async def prune(root: str, keep: int, *, token: bytes | None = None, compress: str = "zstd:1") -> list[str]:
    """Merge the oldest images into their children until at most ``keep`` remain; the removed paths."""
    if keep < 1:
        raise ImageError(f"--keep must be at least 1, not {keep}")
    removed = []
    images = chain_images(root)
    while len(images) > keep:
        base, child = read_image(images[0]), read_image(images[1])
        if child.kind == "full":            # a fresh base (--full-if-needed): nothing depends on the old one
            shutil.rmtree(base.path)
        else:
            await merge_into_child(base, child, token=token, compress=compress)
        removed.append(images.pop(0))
    return removed


async def run_continuous(guest_control: str, root: str, settings: CheckpointSettings, *, every: float, keep: int,
                         count: int | None = None, on_image: Callable[[dict], None] = lambda report: None) -> list[dict]:
    """Checkpoint every ``every`` seconds into ``root`` (leaving the guest running), keeping the
    newest ``keep`` images restorable; ``count`` images then return (None: until cancelled)."""
    if every <= 0:
        raise ImageError(f"--every must be positive, not {every}")
    settings = CheckpointSettings(**{**settings.__dict__, "leave_running": True, "full_if_needed": True})
    reports = []
    images = chain_images(root)
    parent = images[-1] if images else None
    number = int(os.path.basename(parent)) + 1 if parent else 1
    while count is None or len(reports) < count:
        started = trio.current_time()
        path = os.path.join(root, f"{number:0{NAME_WIDTH}d}")
        report = await take_checkpoint(guest_control, path, settings, parent=parent)
        report = replace(report, pruned=tuple(await prune(root, keep, token=settings.token, compress=settings.compress)))
        reports.append(report)
        on_image(report)
        parent, number = path, number + 1
        if count is None or len(reports) < count:
            await trio.sleep_until(started + every)
    return reports
