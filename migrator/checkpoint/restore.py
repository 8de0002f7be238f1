"""Restoring a chain of images: the chain, base first, replayed as one recorded session into
``DestinationMigration`` (its apply, digest and self-check path, unchanged).

``ChainChannel`` plays the source's part: the base's Layout, then every image's pages in order
(later images overwrite earlier pages; round numbers are shifted so that only the base has a
round 0, whose Zero ranges a fresh restore guest may skip), then the last image's Digest. The
destination answers with an Ack of ``Acked.DIGEST``: only when that says the digests matched and the deep
self-check passed does the channel send Commit, and the guest resumes. Anything wrong before that
(a corrupted or truncated frame, a missing parent, a digest differing from the manifest's) fails
the restore and the restore guest is discarded: nothing resumes from a bad image.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import trio

from .. import protocol as p
from ..core.documents import Schema
from ..destination.engine import DestinationMigration, ReceiveSettings
from ..destination.report import ReceiveReport
from ..core.errors import ImageError, MigrationFailed
from ..core.failures import first_cause
from ..transport import ChannelStats, FileReader, open_file_reader
from .image import ImageInfo, check_files, load_chain, read_table


@dataclass(frozen=True)
class ChainStats:
    images: int
    frames_received: int
    bytes_wire_received: int


class ChainChannel:
    """The Channel surface ``DestinationMigration`` uses (receive/send/flush/aclose)."""

    peer = None              # no source's Hello: an image never switches to post-copy

    def place_pages(self, placer) -> None:
        """Images are read from files into buffers: nothing is received in place."""

    def __init__(self, chain: list[ImageInfo], *, token: bytes | None) -> None:
        self.chain = chain
        self.token = token
        self._index = -1
        self._reader: FileReader | None = None
        self._offset = 0          # added to every round number of the current image
        self._last_round = -1
        self._digest_sent = False
        self._commit = False
        self._closed_stats: list[ChannelStats] = []     # of the images read to their end

    async def _open_next(self) -> None:
        """Close the current image and open the next one (none after the last)."""
        await self._close_reader()
        self._index += 1
        if self._index < len(self.chain):
            self._offset = self._last_round + 1
            self._reader = await open_file_reader(self.chain[self._index].stream, token=self.token)

    async def _close_reader(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            self._closed_stats.append(reader.statistics())
            await reader.aclose()

    @property
    def _image(self) -> ImageInfo:
        return self.chain[self._index]

    async def receive(self) -> p.Event:
        if self._index < 0:
            await self._open_next()
        while True:
            if self._commit:
                self._commit = False
                return p.Commit()
            if self._reader is None:
                raise ImageError(f"{self.chain[-1].stream}: the chain ended without a verified digest")
            try:
                event = await self._reader.receive()
            except trio.EndOfChannel:      # this image's Index was read and checked: the next one
                await self._open_next()
                continue
            out = self._translate(event)
            if out is not None:
                return out

    def _translate(self, event: p.Event) -> p.Event | None:
        kind, image, shift = type(event), self._image, self._offset
        if kind is p.Layout:
            if tuple(event.regions) != image.regions or event.page_size != image.page_size:
                raise ImageError(f"{image.stream}: its Layout differs from the manifest's")
            if event.meta.get("id") != image.id:
                raise ImageError(f"{image.stream}: belongs to image {event.meta.get('id')}, the manifest says {image.id}")
            return event if self._index == 0 else None
        if kind is p.Pages:
            self._last_round = max(self._last_round, event.round + shift)
            return event if not shift else p.Pages(round=event.round + shift, runs=event.runs, payload=event.payload)
        if kind is p.Zero:
            self._last_round = max(self._last_round, event.round + shift)
            return event if not shift else p.Zero(round=event.round + shift, runs=event.runs)
        if kind is p.RoundEnd:
            self._last_round = max(self._last_round, event.round + shift)
            return replace(event, round=event.round + shift)
        if kind is p.Freeze:
            return None
        if kind is p.Digest:
            if event.kind is p.DigestKind.PAGES and event.value.hex() != image.pages_digest:
                raise ImageError(f"{image.stream}: its pages digest differs from the manifest's")
            if self._index != len(self.chain) - 1:
                return None       # an intermediate image's digest: the chain's last one decides
            self._digest_sent = True
            return event
        raise ImageError(f"{image.stream}: unexpected {kind.__name__} in an image")

    async def send(self, event: p.Event) -> None:
        if type(event) is p.Ack and event.of is p.Acked.DIGEST and event.ok and self._digest_sent:
            self._commit = True

    async def flush(self) -> None:
        pass

    def statistics(self) -> ChainStats:
        stats = [*self._closed_stats, *([self._reader.statistics()] if self._reader is not None else [])]
        return ChainStats(len(self.chain), sum(s.frames_received for s in stats),
                          sum(s.bytes_wire_received for s in stats))

    async def aclose(self) -> None:
        await self._close_reader()


@dataclass(frozen=True)
class RestoreSettings:
    token: bytes | None = None
    control_dir: str | None = None   # where the restored guest's control socket goes
    memfd: bool = False


async def restore_chain(image_dir: str, settings: RestoreSettings = RestoreSettings(), *, log=print) -> RestoreReport:
    """Start a restore guest, apply base..``image_dir``, check digests and the deep self-check,
    resume it. Returns the destination's report plus the chain; raises ImageError for a bad
    chain (before any guest starts) and MigrationFailed (guest discarded) for a bad stream."""
    started = time.perf_counter()
    chain = await trio.to_thread.run_sync(load_chain, image_dir)
    for image in chain:   # sizes and digest tables first: a damaged image is refused before any guest starts
        check_files(image)
        await trio.to_thread.run_sync(read_table, image)
    if settings.control_dir is not None:
        os.makedirs(settings.control_dir, mode=0o700, exist_ok=True)
    channel = ChainChannel(chain, token=settings.token)
    receive = ReceiveSettings(memfd=settings.memfd, control_dir=settings.control_dir, deep_check=True)
    restore = DestinationMigration(channel, receive, log=log)
    try:
        report = await restore.run()
    except MigrationFailed as exc:
        cause = first_cause(exc.__cause__) if exc.__cause__ is not None else None
        if isinstance(cause, ImageError):
            raise ImageError(f"{cause} (restore guest discarded)") from exc
        raise
    finally:
        await channel.aclose()
    received = {f.name: getattr(report, f.name) for f in fields(ReceiveReport)}
    return RestoreReport(
        **(received | {"schema": Schema(RestoreReport.SCHEMA), "kind": "restore", "peer": chain[-1].path}),
        chain=tuple(image.path for image in chain), image=chain[-1].path,
        verified=report.result == "resumed", restore_s=time.perf_counter() - started,
    )


@dataclass(frozen=True, slots=True)
class RestoreReport(ReceiveReport):
    """A checkpoint chain restored (``migrator restore``): the receiving side's report of the
    replayed stream (``peer``: the image restored), plus the chain it came from."""

    SCHEMA: ClassVar[str] = "migrator.restore"

    chain: tuple[str, ...] = ()      # the image directories applied, base first
    image: str = ""                  # the image restored (the chain's last)
    verified: bool = False
    restore_s: float = 0.0
