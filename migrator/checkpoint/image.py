"""One checkpoint image on disk, and chains of them: format, atomic commit, validation.

An image is a directory::

    D/image.json        the manifest, written last: id, parent (id and relative path), layout,
                        per-image counts, bytes raw and stored, digests, frozen time
    D/<stream>.mgrt     the recorded migration stream (file transport: Hello, Layout, Pages,
                        Zero, RoundEnd, Freeze, Digest, then the Index), named by the manifest
    D/pages.xxh         one 64-bit digest per page of the guest's memory *as of this image*
                        (base .. D applied), little-endian; an incremental image starts from its
                        parent's table, and restore compares the table's digest (sent as the
                        stream's ``Digest`` of ``DigestKind.PAGES``) with what it applied

A new image is written under ``D.partial-*`` and renamed to ``D`` once every file in it is
fsynced, so a checkpoint that crashed never looks complete. Merging an image into its child
(pruning) writes the child's new stream under a new name and then replaces ``image.json``
atomically: at every instant one consistent manifest exists.

Nothing here trusts the disk: every size, hash and parent link is checked, and a bad one raises
``ImageError`` naming the file (and the offset where there is one).
"""

from __future__ import annotations

import array
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..core.errors import ImageError
from ..core.files import write_file
from ..core.model import Region

FORMAT_NAME = "migrator-image"
FORMAT = f"{FORMAT_NAME}/2"       # 2: streams of protocol version 2 (typed control fields)
MANIFEST = "image.json"
TABLE = "pages.xxh"
MAX_MANIFEST = 16 << 20
MAX_CHAIN = 10_000


@dataclass(frozen=True)
class ImageInfo:
    """A validated manifest, plus where it was read from."""

    path: str                       # the image directory
    id: str
    kind: str                       # "full" or "incremental"
    parent_id: str | None
    parent_path: str | None         # absolute, resolved from the manifest's relative path
    page_size: int
    regions: tuple[Region, ...]
    stream: str                     # absolute path of the stream file
    stream_bytes: int
    table_xxh3: str
    pages_digest: str               # hex of the cumulative per-page table's digest
    manifest: dict[str, Any] = field(repr=False)

    @property
    def total_pages(self) -> int:
        return sum(r.length for r in self.regions) // self.page_size

    @property
    def table_path(self) -> str:
        return os.path.join(self.path, TABLE)


# --- reading and checking -----------------------------------------------------------------------


def _field(doc: dict, name: str, kind: type | tuple[type, ...], where: str):
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ImageError(f"{where}: field {name!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def read_image(path: str) -> ImageInfo:
    """The manifest of the image directory ``path``; ImageError if it is not a complete image."""
    path = os.path.abspath(path)
    where = os.path.join(path, MANIFEST)
    try:
        with open(where, "rb") as f:
            data = f.read(MAX_MANIFEST + 1)
    except FileNotFoundError:
        hint = " (an unfinished checkpoint?)" if os.path.isdir(path) else ""
        raise ImageError(f"{where}: no such file: {path} is not a complete image{hint}") from None
    except OSError as exc:
        raise ImageError(f"{where}: cannot read: {exc.strerror}") from exc
    if len(data) > MAX_MANIFEST:
        raise ImageError(f"{where}: larger than {MAX_MANIFEST} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        offset = getattr(exc, "pos", getattr(exc, "start", 0))
        raise ImageError(f"{where}: corrupted manifest at offset {offset}: {exc}") from None
    found = doc.get("format") if isinstance(doc, dict) else None
    if found != FORMAT:
        if isinstance(found, str) and found.startswith(f"{FORMAT_NAME}/"):
            raise ImageError(f"{where}: image format {found[:64]!r}; this migrator reads {FORMAT!r} only "
                             "(the image was taken by another migrator version: restore it with that one)")
        raise ImageError(f"{where}: not a {FORMAT} manifest")
    image_id = _field(doc, "id", str, where)
    kind = _field(doc, "kind", str, where)
    if kind not in ("full", "incremental"):
        raise ImageError(f"{where}: kind {kind!r} is neither full nor incremental")
    parent = doc.get("parent")
    parent_id = parent_path = None
    if kind == "incremental":
        if not isinstance(parent, dict):
            raise ImageError(f"{where}: an incremental image without a parent")
        parent_id = _field(parent, "id", str, where)
        parent_path = os.path.normpath(os.path.join(path, _field(parent, "path", str, where)))
    layout = _field(doc, "layout", dict, where)
    page_size = _field(layout, "page_size", int, where)
    regions = []
    for entry in _field(layout, "regions", list, where):
        if not (isinstance(entry, list) and len(entry) == 2 and all(type(v) is int and v >= 0 for v in entry)):
            raise ImageError(f"{where}: bad region {entry!r}")
        if entry[1] <= 0 or entry[0] % page_size or entry[1] % page_size:
            raise ImageError(f"{where}: region {entry!r} is empty or not page aligned")
        regions.append(Region(entry[0], entry[1]))
    if page_size <= 0 or page_size & (page_size - 1) or not regions:
        raise ImageError(f"{where}: bad layout (page size {page_size}, {len(regions)} regions)")
    stream = _field(doc, "stream", dict, where)
    name = _field(stream, "file", str, where)
    if os.sep in name or name.startswith("."):
        raise ImageError(f"{where}: stream file name {name!r} must be a plain name inside the image")
    digests = _field(doc, "digests", dict, where)
    return ImageInfo(
        path=path, id=image_id, kind=kind, parent_id=parent_id, parent_path=parent_path,
        page_size=page_size, regions=tuple(regions), stream=os.path.join(path, name),
        stream_bytes=_field(stream, "bytes", int, where), table_xxh3=_field(digests, "table_xxh3", str, where),
        pages_digest=_field(digests, "pages", str, where), manifest=doc,
    )


def check_files(image: ImageInfo) -> None:
    """Cheap checks before reading a stream: the files exist with the sizes the manifest says."""
    for path, expected in ((image.stream, image.stream_bytes), (image.table_path, image.total_pages * 8)):
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise ImageError(f"{path}: missing (named by {os.path.join(image.path, MANIFEST)})") from None
        if size < expected:
            raise ImageError(f"{path}: truncated at offset {size}: the manifest says {expected} bytes")
        if size > expected:
            raise ImageError(f"{path}: {size} bytes, the manifest says {expected}: extra data at offset {expected}")


def chain_images(root: str) -> list[str]:
    """Complete images of a chain directory (``checkpoint --every``: ``000001`` …), oldest first;
    unfinished ``*.partial-*`` directories are not images."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.isdigit() and os.path.exists(os.path.join(root, n, MANIFEST)))
    return [os.path.join(root, n) for n in names]


def resolve_image(path: str) -> str:
    """``path`` itself, or for a chain directory its newest image."""
    if not os.path.exists(os.path.join(path, MANIFEST)):
        images = chain_images(path)
        if images:
            return images[-1]
    return path


def load_chain(path: str) -> list[ImageInfo]:
    """The chain ending at image ``path`` (or a chain directory's newest), base (a full image)
    first. Every link is checked: the parent exists, has the id the child names, and the same
    memory layout."""
    chain = [read_image(resolve_image(path))]
    seen = {chain[0].path}
    while chain[-1].kind == "incremental":
        child = chain[-1]
        manifest = os.path.join(child.path, MANIFEST)
        if not os.path.isdir(child.parent_path):
            raise ImageError(f"{manifest}: parent image {child.parent_path} (id {child.parent_id}) is missing")
        parent = read_image(child.parent_path)
        if parent.id != child.parent_id:
            raise ImageError(f"{manifest}: parent {parent.path} has id {parent.id}, the image names {child.parent_id}")
        if parent.regions != child.regions or parent.page_size != child.page_size:
            raise ImageError(f"{manifest}: layout differs from its parent {parent.path}")
        if parent.path in seen or len(chain) >= MAX_CHAIN:
            raise ImageError(f"{manifest}: the chain of parents loops or exceeds {MAX_CHAIN} images")
        seen.add(parent.path)
        chain.append(parent)
    chain.reverse()
    return chain


def read_table(image: ImageInfo) -> array.array:
    """The image's per-page digest table, checked against the manifest's hash."""
    path = image.table_path
    try:
        with open(path, "rb") as f:
            data = f.read(image.total_pages * 8 + 1)
    except FileNotFoundError:
        raise ImageError(f"{path}: missing (named by {os.path.join(image.path, MANIFEST)})") from None
    if len(data) != image.total_pages * 8:
        raise ImageError(f"{path}: truncated at offset {len(data)}: expected {image.total_pages * 8} bytes")
    if xxhash.xxh3_64_hexdigest(data) != image.table_xxh3:
        raise ImageError(f"{path}: corrupted (its hash differs from the manifest's)")
    table = array.array("Q")
    table.frombytes(data)
    if sys.byteorder != "little":
        table.byteswap()
    return table


def table_bytes(table: array.array) -> bytes:
    if sys.byteorder != "little":
        table = array.array("Q", table)
        table.byteswap()
    return table.tobytes()


# --- writing ------------------------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def write_manifest(image_dir: str, doc: dict) -> None:
    """Replace an image's manifest atomically and durably (never through a link)."""
    write_file(os.path.join(image_dir, MANIFEST), manifest_bytes(doc), durable=True)


class PendingImage:
    """A scratch directory that becomes the image ``path`` on ``commit`` (fsync every file, then
    one atomic rename) or disappears on ``discard``. Refuses to replace an existing ``path``.

    The image's parent directory is held open from the start, and the scratch directory is made
    and renamed relative to it, so the image lands where its scratch directory was made even if
    the path to it is swapped meanwhile. A link (or file) that appears at ``path`` is never
    followed: renaming a directory over anything but an empty directory fails, and the commit
    with it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.parent = os.path.dirname(self.path)
        self.name = os.path.basename(self.path)
        if os.path.lexists(self.path):
            raise ImageError(f"{self.path}: already exists; checkpoints never overwrite an image")
        os.makedirs(self.parent, exist_ok=True)
        self._parent_fd: int | None = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._scratch_name = self._make_scratch()
        except BaseException:
            self._close()
            raise
        self.scratch = os.path.join(self.parent, self._scratch_name)

    def _make_scratch(self) -> str:
        for _ in range(100):
            name = f"{self.name}.partial-{secrets.token_hex(4)}"
            try:
                os.mkdir(name, 0o700, dir_fd=self._parent_fd)
                return name
            except FileExistsError:
                continue
        raise ImageError(f"{self.path}: no free name for its scratch directory")

    def commit(self) -> None:
        for name in os.listdir(self.scratch):
            fd = os.open(os.path.join(self.scratch, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.scratch)
        if os.path.lexists(self.path):
            raise ImageError(f"{self.path}: appeared while the checkpoint was written; left it alone")
        try:
            os.rename(self._scratch_name, self.name, src_dir_fd=self._parent_fd, dst_dir_fd=self._parent_fd)
        except OSError as exc:
            raise ImageError(f"{self.path}: appeared while the checkpoint was written ({exc.strerror}); "
                             "left it alone") from None
        os.fsync(self._parent_fd)
        self._close()

    def discard(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        self._close()

    def _close(self) -> None:
        if self._parent_fd is not None:
            fd, self._parent_fd = self._parent_fd, None
            os.close(fd)


def relative_parent(child_dir: str, parent_dir: str) -> str:
    """The parent's path as stored in the child's manifest: relative, so a chain can be moved."""
    return os.path.relpath(os.path.abspath(parent_dir), os.path.abspath(child_dir))
