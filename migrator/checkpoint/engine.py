"""Taking a checkpoint image: a live migration whose destination is a file.

It is composed of the source's phases, with an image file as the sink
(``migrator.source.sink.ImageSink``) instead of a live peer:

- nobody answers: rounds end without an acknowledgement, and a failure discards the file;
- with a parent image, round 0 is the tracker's ``collect`` (pages written since the parent's
  final scan) instead of arm-and-send-everything, and the per-page digest table starts from the
  parent's, so the image's pages ``Digest`` (``DigestKind.PAGES``)
  covers the whole memory as of this image;
- the guest's tag names this image before the first scan: every scan resets what "written"
  means, so a later incremental image may only build on the image that scanned last;
- the switch-over ends at the file: freeze, final scan-and-copy, thaw (``leave_running``) or keep
  frozen, seal the stream, write the table and the manifest, rename the directory into place,
  and only then, without ``leave_running``, kill the guest.

Frozen time is measured from the freeze to the moment the last page is captured (and the guest
thawed, with ``leave_running``). Any failure before the image is renamed into place thaws the
guest and removes the scratch directory.

Needs what ``migrate`` needs: the guest's control socket, ptrace-read rights over the guest, and
userfaultfd WP_ASYNC + PAGEMAP_SCAN (Linux 6.7+) for the default tracker.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import trio
import xxhash

from ..core.deadlines import deadline
from ..core.errors import ImageError
from ..core.files import write_file
from ..guest.client import GuestClient
from ..core.model import Run
from ..core.digest import PageDigests
from ..core.documents import Schema, utc_now
from ..core.errors import MigrationFailed
from ..core.failures import describe
from ..core.runs import count_pages, union
from ..source.attach import AttachedGuest
from ..source.estimator import DowntimeEstimator, switchover_fixed_ms
from ..source.migration import MigrateSettings
from ..source.pages import PageStream
from ..source.report import MigrationReport, report_of
from ..source.rounds import Precopy, ms
from ..source.sink import ImageSink
from ..source.switchover import Switchover, final_copy
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


class CheckpointMigration:
    """Write an image of the guest behind ``guest_control`` to the new directory ``image_dir``."""

    def __init__(self, guest_control: str, image_dir: str, settings: CheckpointSettings = CheckpointSettings(),
                 *, parent: str | None = None, on_round=None) -> None:
        self.guest_control = guest_control
        self.image_dir = os.path.abspath(image_dir)
        self.checkpoint = settings
        self.settings = settings.migrate_settings()
        self.on_round = on_round
        self.id = uuid.uuid4().hex
        self.parent_dir = parent
        self.parent: ImageInfo | None = None
        self.parent_refused: str | None = None
        self.frozen_ms: float | None = None
        self.image: ImageInfo | None = None
        self.committed = False
        self._guest: AttachedGuest | None = None
        self._precopy: Precopy | None = None
        self._switchover: Switchover | None = None
        self._sink: ImageSink | None = None
        self._pages: PageStream | None = None
        self._zero: list[Run] = []
        self._rule = ("", "")

    async def run(self) -> CheckpointReport:
        """Take the image; returns the report (``image``, ``frozen_ms`` …). Raises ImageError when
        the parent cannot be used, MigrationFailed (guest thawed, nothing written) otherwise."""
        await trio.to_thread.run_sync(self._choose_parent)
        self.pending = PendingImage(self.image_dir)
        started = time.perf_counter()
        self.started_at = utc_now()
        error: BaseException | None = None
        try:
            async with AttachedGuest(self.guest_control, self.settings.tracker) as guest:
                self._guest = guest
                await self._take(guest)
        except BaseException as exc:  # noqa: BLE001 - turned into one typed line below
            error = exc
        finally:
            if self.image is None:
                self.pending.discard()
        self.report = self._report(time.perf_counter() - started, error)
        if error is not None:
            raise MigrationFailed(self.report.error, committed=self.committed) from error
        return self.report

    @property
    def _kind(self) -> str:
        return "incremental" if self.parent else "full"

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

    def _check_parent(self, layout) -> None:
        if self.parent.regions != layout.regions or self.parent.page_size != layout.page_size:
            raise ImageError(f"the guest's memory layout differs from the parent image {self.parent.path}'s")
        if len(self.parent_table) != layout.total_pages:
            raise ImageError(f"{self.parent.table_path}: {len(self.parent_table)} pages, the guest has {layout.total_pages}")

    # --- the image -------------------------------------------------------------------------------

    async def _take(self, guest: AttachedGuest) -> None:
        s, layout = self.settings, guest.layout
        digests = PageDigests(layout.total_pages, layout.page_size)
        if self.parent is not None:
            self._check_parent(layout)
            digests.load(self.parent_table)
        stream = os.path.join(self.pending.scratch, STREAM)
        async with ImageSink.open(stream, token=s.token, compress=s.compress) as sink:
            self._sink = sink
            pages = self._pages = PageStream(guest.memory, layout, digests, sink, keep_sent=True)
            estimator = DowntimeEstimator(fixed_ms=switchover_fixed_ms(layout.total_bytes),
                                          page_size=layout.page_size, bandwidth=s.bandwidth)
            precopy = self._precopy = Precopy(guest, sink, pages, estimator, s.policy(),
                                              round_timeout_s=s.round_timeout_s, on_round=self.on_round)
            await precopy.send_layout({"id": self.id, "tracker": s.tracker, "size": layout.total_bytes,
                                       "image": True, "kind": self._kind,
                                       "parent": self.parent.id if self.parent else ""})
            await guest.set_tag(image_tag(self.id))
            dirty, decision = await precopy.run(self._first_scan(precopy))
            self._rule = (str(decision.rule), decision.reason)
            state = self._switchover = Switchover(number=len(precopy.rounds))
            with deadline(s.round_timeout_s, "the final copy (--round-timeout)"):
                await final_copy(guest, sink, pages, digests, dirty, state, verify="pages")
                if self.checkpoint.leave_running:
                    await trio.to_thread.run_sync(guest.throttle.thaw)
                self.frozen_ms = state.downtime_ms = ms(time.perf_counter() - state.freeze_at)
                t = time.perf_counter()
                await sink.seal()                                  # Index, fsync
                state.parts["seal"] = ms(time.perf_counter() - t)
                await trio.to_thread.run_sync(self._commit_image, digests)
        if not self.checkpoint.leave_running:
            self.committed = guest.committed = True   # the image holds the guest now; it never resumes
            guest.terminate()

    def _first_scan(self, precopy: Precopy):
        """Round 0: from scratch (a full image: zero ranges recorded for the manifest), or what
        was written since the parent's final scan (re-protected by the same collect)."""
        if self.parent is not None:
            tracker = self._guest.tracker
            return lambda: (tracker.collect(), [])

        def full() -> tuple[list[Run], list[Run]]:
            populated, self._zero = precopy.arm_and_scan()
            return populated, self._zero

        return full

    def _commit_image(self, digests: PageDigests) -> None:
        """Write the digest table and the manifest, then rename the directory into place."""
        scratch, layout, sent = self.pending.scratch, self._guest.layout, self._pages.sent
        table = table_bytes(digests.table)
        write_file(os.path.join(scratch, TABLE), table)
        unique = union([], [run for runs in sent for run in runs], layout.page_size)
        stats = self._sink.statistics()
        stream_bytes = os.stat(os.path.join(scratch, STREAM)).st_size
        doc = {
            "format": FORMAT,
            "id": self.id,
            "kind": self._kind,
            "parent": {"id": self.parent.id, "path": relative_parent(self.image_dir, self.parent.path)}
            if self.parent else None,
            "parent_refused": self.parent_refused,
            "created": time.time(),
            "guest": {"pid": layout.pid, "control": self.guest_control},
            "layout": {"page_size": layout.page_size, "regions": [[r.start, r.length] for r in layout.regions]},
            "tracker": self.settings.tracker,
            "compress": self.settings.compress,
            "stream": {"file": STREAM, "bytes": stream_bytes},
            "digests": {"pages": digests.value().hex(), "table_xxh3": xxhash.xxh3_64_hexdigest(table)},
            "pages": {
                "unique": count_pages(unique),
                "zero": count_pages(self._zero),
                "sent": sum(count_pages(runs) for runs in sent),
                "final": self._switchover.final_pages,
            },
            "bytes_raw": stats.bytes_raw,
            "bytes_stored": stream_bytes,
            "ratio": round(stats.bytes_raw / stream_bytes, 3) if stream_bytes else 0.0,
            "frozen_ms": self.frozen_ms,
            "frozen_parts_ms": dict(self._switchover.parts),
            "rounds": len(self._precopy.rounds) + 1,
            "rule": self._rule[0],
            "merged": [],
        }
        write_file(os.path.join(scratch, MANIFEST), manifest_bytes(doc))
        self.pending.commit()
        self.image = read_image(self.image_dir)

    def _report(self, total_s: float, error: BaseException | None) -> CheckpointReport:
        source = report_of(
            self.settings, layout=getattr(self._guest, "layout", None), precopy=self._precopy,
            switchover=self._switchover, wire_bytes=self._sink.statistics().bytes_wire if self._sink else 0,
            rule=self._rule, error=None if error is None else describe(error), total_s=total_s,
            result="written" if self.image else "failed", committed=self.committed, kind="checkpoint",
            id=self.id, peer=self.image_dir, started_at=self.started_at,
        )
        measured = {f.name: getattr(source, f.name) for f in fields(MigrationReport)}
        return CheckpointReport(
            **(measured | {"schema": Schema(CheckpointReport.SCHEMA)}),
            image=self.image_dir if self.image else None,
            image_kind=self._kind,
            parent=self.parent.path if self.parent else None,
            parent_refused=self.parent_refused,
            frozen_ms=self.frozen_ms,
            leave_running=self.checkpoint.leave_running,
        )


@dataclass(frozen=True, slots=True)
class CheckpointReport(MigrationReport):
    """A checkpoint's outcome: the source side's report (its ``id`` is the image's) plus what the
    image became. Serialised flat, like the migration report with these fields added."""

    SCHEMA: ClassVar[str] = "migrator.checkpoint"

    image: str | None = None             # the image directory, None when nothing was written
    image_kind: Literal["full", "incremental"] = "full"
    parent: str | None = None
    parent_refused: str | None = None    # why a requested parent was not used (--full-if-needed)
    frozen_ms: float | None = None
    leave_running: bool = False
    pruned: tuple[str, ...] = ()         # images merged away after this one (continuous checkpoints)


async def take_checkpoint(guest_control: str, image_dir: str, settings: CheckpointSettings = CheckpointSettings(),
                          *, parent: str | None = None, on_round=None) -> CheckpointReport:
    """Write one image; the report (see ``CheckpointMigration.run``)."""
    return await CheckpointMigration(guest_control, image_dir, settings, parent=parent, on_round=on_round).run()
