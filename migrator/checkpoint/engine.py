"""Taking a checkpoint image: a live migration whose destination is a file.

``CheckpointMigration`` is ``SourceMigration`` with four things changed, each an override of
one of its hooks:

- the channel is an image file (``_open_channel``), written through the file transport
  (``migrator.transport.open_file_writer``), and nobody answers on it (``_watch_peer`` just
  waits; ``ACKS_ROUNDS`` is off, so no Ack is awaited; a failure discards the file instead of
  recording an Abort in it, ``_send_abort``);
- with a parent image, round 0 is the tracker's ``collect`` (pages written since the parent's
  final scan) instead of arm-and-send-everything (``_first_scan``), and the per-page digest
  table starts from the parent's (``_migrate``), so the image's ``Digest(kind="pages")`` covers
  the whole memory as of this image;
- the guest's tag names this image before the first scan (``_scan_tag``): every scan resets what
  "written" means, so a later incremental image may only build on the image that scanned last;
- the switch-over ends at the file (``_stop_and_copy``): freeze, final scan-and-copy, thaw
  (``leave_running``) or keep frozen, seal the stream, write the table and the manifest, rename
  the directory into place, and only then, without ``leave_running``, kill the guest.

Frozen time is measured from the freeze to the moment the last page is captured (and the guest
thawed, with ``leave_running``). Any failure before the image is renamed into place thaws the
guest and removes the scratch directory.

Needs what ``migrate`` needs: the guest's control socket, ptrace-read rights over the guest, and
userfaultfd WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+) for the default tracker.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import trio
import xxhash

from ..core.deadlines import deadline
from ..core.errors import ImageError
from ..core.files import write_file
from ..guest.client import GuestClient
from ..core.model import Run
from ..core.runs import count_pages, union
from ..source.engine import MigrateSettings, SourceMigration, _ms, _terminate
from ..transport import open_file_writer
from .image import (
    FORMAT, MANIFEST, TABLE, ImageInfo, PendingImage, load_chain, manifest_bytes, read_image, read_table,
    relative_parent, table_bytes,
)

STREAM = "stream.mgrt"


def image_tag(image_id: str) -> str:
    """What the guest's tag says after image ``image_id`` scanned it."""
    return f"image:{image_id}"


@dataclass(frozen=True)
class CheckpointSettings:
    leave_running: bool = False       # thaw the guest after the image (default: kill it, like criu dump)
    full_if_needed: bool = False      # a parent that did not scan the guest last: take a full image
    downtime_ms: float = 20.0         # pre-copy into the file until the frozen part is expected this short
    max_rounds: int = 10
    compress: str = "zstd:1"
    tracker: str = "wp-async"
    token: bytes | None = None        # MAC the image with this key (restore/inspect need it too)
    round_timeout_s: float = 300.0

    def migrate_settings(self) -> MigrateSettings:
        # A checkpoint that does not converge switches over rather than throttling the guest.
        return MigrateSettings(
            downtime_ms=self.downtime_ms, max_rounds=self.max_rounds, compress=self.compress,
            tracker=self.tracker, verify="pages", force_switchover=True, token=self.token,
            round_timeout_s=self.round_timeout_s,
        )


class CheckpointMigration(SourceMigration):
    """Write an image of the guest behind ``guest_control`` to the new directory ``image_dir``."""

    ACKS_ROUNDS = False   # an image file answers nothing

    def __init__(self, guest_control: str, image_dir: str, settings: CheckpointSettings = CheckpointSettings(),
                 *, parent: str | None = None, on_round=None) -> None:
        super().__init__(guest_control, os.path.abspath(image_dir), settings.migrate_settings(), on_round=on_round)
        self.image_dir = os.path.abspath(image_dir)
        self.checkpoint = settings
        self.parent_dir = parent
        self.parent: ImageInfo | None = None
        self.parent_refused: str | None = None
        self.frozen_ms: float | None = None
        self.image: ImageInfo | None = None
        self._sent: list[list[Run]] = []
        self._zero: list[Run] = []

    async def run(self) -> dict:
        """Take the image; returns the report (``image``, ``frozen_ms`` …). Raises ImageError when
        the parent cannot be used, MigrationFailed (guest thawed, nothing written) otherwise."""
        await trio.to_thread.run_sync(self._choose_parent)
        self.pending = PendingImage(self.image_dir)
        try:
            return await super().run()
        finally:
            if self.image is None:
                self.pending.discard()

    # --- the parent ------------------------------------------------------------------------------

    def _choose_parent(self) -> None:
        if self.parent_dir is None:
            return
        parent = load_chain(self.parent_dir)[-1]          # every link up to a full image must be there
        with GuestClient(self.guest_control) as client:
            tag = client.stats().get("tag")
        if tag != image_tag(parent.id):
            reason = (f"the guest was last scanned by {tag!r}, not by the parent image {parent.path} "
                      f"({image_tag(parent.id)}): pages written since that image are unknown")
            if self.checkpoint.full_if_needed:
                self.parent_refused = reason
                return
            raise ImageError(f"refusing an incremental image: {reason}; take a full image or pass --full-if-needed")
        self.parent = parent
        self.parent_table = read_table(parent)

    # --- hooks of SourceMigration ----------------------------------------------------------------

    async def _open_channel(self):
        s = self.settings
        return await open_file_writer(os.path.join(self.pending.scratch, STREAM), token=s.token, compress=s.compress)

    async def _watch_peer(self) -> None:
        await trio.sleep_forever()      # an image file never answers (a FileWriter has no receive)

    async def _send_abort(self, reason: str) -> None:
        self.channel.discard()          # nobody to tell: a failed image is never sealed, nor named

    def _layout_meta(self) -> dict:
        return {**super()._layout_meta(), "image": True, "kind": self._kind,
                "parent": self.parent.id if self.parent else ""}

    @property
    def _kind(self) -> str:
        return "incremental" if self.parent else "full"

    def _scan_tag(self) -> str:
        return image_tag(self.id)

    async def _migrate(self) -> None:
        if self.parent is not None:
            if self.parent.regions != self.layout.regions or self.parent.page_size != self.layout.page_size:
                raise ImageError(f"the guest's memory layout differs from the parent image {self.parent.path}'s")
            if len(self.parent_table) != self.layout.total_pages:
                raise ImageError(f"{self.parent.table_path}: {len(self.parent_table)} pages, the guest has {self.layout.total_pages}")
            self.digests.table = self.parent_table
        await super()._migrate()

    def _first_scan(self) -> tuple[list[Run], list[Run]]:
        if self.parent is None:
            populated, zero = super()._first_scan()
            self._zero = zero
            return populated, zero
        return self.tracker.collect(), []      # written since the parent's final scan; re-protected

    async def _send_pages(self, r, runs: list[Run]) -> None:
        self._sent.append(runs)
        await super()._send_pages(r, runs)

    async def _stop_and_copy(self, dirty: list[Run]) -> None:
        with deadline(self.settings.round_timeout_s, "the final copy (--round-timeout)"):
            freeze_at, _ = await self._final_copy(dirty)
            if self.checkpoint.leave_running:
                await trio.to_thread.run_sync(self.throttle.thaw)
            self.frozen_ms = self.downtime_ms = _ms(time.perf_counter() - freeze_at)
            t = time.perf_counter()
            await self.channel.aclose()                        # Index, fsync, rename
            self.parts["seal"] = _ms(time.perf_counter() - t)
            await trio.to_thread.run_sync(self._commit_image)
        if not self.checkpoint.leave_running:
            self.committed = True       # the image holds the guest now; it never resumes
            _terminate(self.layout.pid)

    def _commit_image(self) -> None:
        """Write the digest table and the manifest, then rename the directory into place."""
        scratch = self.pending.scratch
        table = table_bytes(self.digests.table)
        write_file(os.path.join(scratch, TABLE), table)
        sent = union([], [run for runs in self._sent for run in runs], self.layout.page_size)
        stats = self.channel.statistics()
        stream_bytes = os.stat(os.path.join(scratch, STREAM)).st_size
        doc = {
            "format": FORMAT,
            "id": self.id,
            "kind": self._kind,
            "parent": {"id": self.parent.id, "path": relative_parent(self.image_dir, self.parent.path)}
            if self.parent else None,
            "parent_refused": self.parent_refused,
            "created": time.time(),
            "guest": {"pid": self.layout.pid, "control": self.guest_control},
            "layout": {"page_size": self.layout.page_size,
                       "regions": [[r.start, r.length] for r in self.layout.regions]},
            "tracker": self.settings.tracker,
            "compress": self.settings.compress,
            "stream": {"file": STREAM, "bytes": stream_bytes},
            "digests": {"pages": self.digests.value().hex(), "table_xxh3": xxhash.xxh3_64_hexdigest(table)},
            "pages": {
                "unique": count_pages(sent),
                "zero": count_pages(self._zero),
                "sent": sum(count_pages(runs) for runs in self._sent),
                "final": self.final_pages,
            },
            "bytes_raw": stats.bytes_raw,
            "bytes_stored": stream_bytes,
            "ratio": round(stats.bytes_raw / stream_bytes, 3) if stream_bytes else 0.0,
            "frozen_ms": self.frozen_ms,
            "frozen_parts_ms": dict(self.parts),
            "rounds": len(self.rounds) + 1,
            "rule": self.rule,
            "merged": [],
        }
        write_file(os.path.join(scratch, MANIFEST), manifest_bytes(doc))
        self.pending.commit()
        self.image = read_image(self.image_dir)

    def _report(self, total_s: float, error: BaseException | None) -> dict:
        report = super()._report(total_s, error)
        report.update(
            kind="checkpoint",
            image=self.image_dir if self.image else None,
            image_id=self.id,
            image_kind=self._kind,
            parent=self.parent.path if self.parent else None,
            parent_refused=self.parent_refused,
            frozen_ms=self.frozen_ms,
            leave_running=self.checkpoint.leave_running,
            result="written" if self.image else "failed",
        )
        return report


async def take_checkpoint(guest_control: str, image_dir: str, settings: CheckpointSettings = CheckpointSettings(),
                          *, parent: str | None = None, on_round=None) -> dict:
    """Write one image; the report (see ``CheckpointMigration.run``)."""
    return await CheckpointMigration(guest_control, image_dir, settings, parent=parent, on_round=on_round).run()
