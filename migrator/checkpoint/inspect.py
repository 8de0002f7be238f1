"""``inspect``: what a chain of images holds (our ``crit``), and ``--verify`` without restoring.

The summary comes from the manifests alone. Verification reads every frame of every image (each
frame's checksum or MAC, each payload's tag, the Index), replays the page contents into a per-page
digest table the way a restore would apply them, and compares that table with each image's
``Digest`` frame, its manifest and its ``pages.xxh``: an image that verifies restores to exactly
the memory it recorded, short of the guest's own self-check.
"""

from __future__ import annotations

from .. import protocol as p
from ..core.digest import PageDigests
from ..core.errors import ImageError
from ..core.model import MemoryLayout
from ..transport import open_file_reader
from .image import ImageInfo, check_files, load_chain, read_table


def _summary(image: ImageInfo) -> dict:
    m = image.manifest
    return {
        "path": image.path, "id": image.id, "kind": image.kind, "parent": image.parent_id,
        "created": m.get("created"), "pages": m.get("pages"), "bytes_raw": m.get("bytes_raw"),
        "bytes_stored": m.get("bytes_stored"), "ratio": m.get("ratio"), "frozen_ms": m.get("frozen_ms"),
        "frozen_parts_ms": m.get("frozen_parts_ms"), "rounds": m.get("rounds"), "digest": image.pages_digest,
        "compress": m.get("compress"), "tracker": m.get("tracker"), "merged": m.get("merged", []),
    }


def describe_chain(image_dir: str) -> dict:
    chain = load_chain(image_dir)
    last = chain[-1]
    return {
        "image": last.path,
        "layout": {"page_size": last.page_size, "regions": [[r.start, r.length] for r in last.regions],
                   "bytes": sum(r.length for r in last.regions)},
        "chain": [_summary(image) for image in chain],
        "bytes_stored": sum(image.manifest.get("bytes_stored", 0) for image in chain),
    }


async def verify_chain(image_dir: str, *, token: bytes | None = None) -> dict:
    """Check every byte of the chain; returns per-image results. Raises ImageError at the first
    defect, naming the file (and offset)."""
    chain = load_chain(image_dir)
    layout = MemoryLayout(0, chain[0].page_size, chain[0].regions)
    digests = PageDigests(layout.total_pages, layout.page_size)
    results = []
    for image in chain:
        check_files(image)
        frames = pages = 0
        digest = None
        async with await open_file_reader(image.stream, token=token) as reader:
            async for event in reader:
                frames += 1
                kind = type(event)
                if kind is p.Pages:
                    digests.record_runs(layout, list(event.runs), event.payload)
                    pages += event.pages
                elif kind is p.Zero:
                    digests.record_runs(layout, list(event.runs))
                elif kind is p.Digest and event.kind is p.DigestKind.PAGES:
                    digest = event.value.hex()
                elif kind is p.Layout and (tuple(event.regions) != image.regions or event.meta.get("id") != image.id):
                    raise ImageError(f"{image.stream}: its Layout does not match the manifest")
        replayed = digests.value().hex()
        if digest is None:
            raise ImageError(f"{image.stream}: no pages digest in the stream")
        if not digest == replayed == image.pages_digest:
            raise ImageError(f"{image.stream}: pages replayed to digest {replayed}, the stream says {digest}, "
                             f"the manifest {image.pages_digest}")
        if read_table(image) != digests.table:
            raise ImageError(f"{image.table_path}: differs from the table replayed from the chain")
        results.append({"path": image.path, "frames": frames, "pages": pages, "digest": replayed, "ok": True})
    return {"verified": True, "images": results}


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def format_chain(info: dict) -> str:
    layout = info["layout"]
    lines = [
        f"image {info['image']}",
        f"layout: {len(layout['regions'])} region(s), {_size(layout['bytes'])}, page size {layout['page_size']}",
        f"chain: {len(info['chain'])} image(s), {_size(info['bytes_stored'])} stored",
        f"{'#':>2} {'id':<12} {'kind':<11} {'pages':>8} {'unique':>8} {'zero':>8} {'raw':>10} {'stored':>10} "
        f"{'ratio':>6} {'frozen_ms':>9}  digest",
    ]
    for i, image in enumerate(info["chain"]):
        pages = image["pages"] or {}
        frozen = image["frozen_ms"]
        lines.append(
            f"{i:>2} {image['id'][:12]:<12} {image['kind']:<11} {pages.get('sent', 0):>8} {pages.get('unique', 0):>8} "
            f"{pages.get('zero', 0):>8} {_size(image['bytes_raw']):>10} {_size(image['bytes_stored']):>10} "
            f"{image['ratio'] or 0:>6.2f} {frozen if frozen is not None else float('nan'):>9.2f}  {image['digest'][:16]}"
        )
    if "verify" in info:
        lines.append("verify: every frame, payload and digest checked: OK")
    return "\n".join(lines)
