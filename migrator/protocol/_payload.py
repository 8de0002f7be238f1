"""Page payload compression: pure functions, safe to call from worker threads.

zstd compressors and decompressors are not thread-safe, so callers pass their own (one per
thread); everything else here is immutable. A batch that zstd cannot shrink by at least 1/64
goes raw (no ZSTD flag). Before compressing a large batch, a few sampled pages are tried one by
one: if none of them shrinks, the batch goes raw without the full attempt (random or encrypted
pages then cost a few microseconds, not a pass of zstd over a megabyte).

Zero pages of a batch worth compressing are left out (flag ZEROS), as QEMU's multifd zero-page
detection does, when the peer's Hello lists ``ZERO_PAGES`` (or the stream is a recorded image):
the payload starts with a bitmap, bit i set when page i is all zero, followed by
the other pages, raw or compressed on their own. Finding, gathering and scattering them is C
(``migrator.native.pages``, without the GIL) that stops reading a page at its first non-zero word;
zstd would spend far longer on a batch that mixes zero pages with incompressible ones (on
half-zero random data it runs at ~1.6 GB/s, against ~5 GB/s on random data alone), and the
receiver would decompress them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import zstandard

from ..core.errors import LocalProtocolError
from ..native.pages import ffi, lib
from ._frames import F_ZEROS, F_ZSTD

MIN_LEVEL, MAX_LEVEL = -100, 22
ZERO_PAGES = "zero-pages"   # Hello feature: this side reads the ZEROS flag (older peers refuse it)
SAMPLE = 4096          # bytes per sampled piece
SAMPLED_FROM = 64 << 10  # batches at least this large are sampled first
ZERO_SCAN_UNIT = 32    # the zero-page scan reads 32 bytes at a time (page sizes are multiples)


@dataclass(frozen=True, slots=True)
class Compression:
    """``level`` None means no compression."""

    level: int | None

    @classmethod
    def parse(cls, spec: str) -> Compression:
        """``"none"``, ``"zstd"`` (level 1) or ``"zstd:LEVEL"`` (-100..22; negative = faster)."""
        if not isinstance(spec, str):
            raise LocalProtocolError(f"compression {spec!r}: expected a string such as 'zstd:1' or 'none'")
        if spec == "none":
            return cls(None)
        if spec == "zstd":
            return cls(1)
        match = re.fullmatch(r"zstd:(-?\d+)", spec)
        if not match or not MIN_LEVEL <= int(match.group(1)) <= MAX_LEVEL:
            raise LocalProtocolError(
                f"compression {spec!r}: expected 'none', 'zstd' or 'zstd:LEVEL' with LEVEL in {MIN_LEVEL}..{MAX_LEVEL}"
            )
        return cls(int(match.group(1)))

    def compressor(self) -> zstandard.ZstdCompressor | None:
        """A new compressor for one thread (None when compression is off)."""
        if self.level is None:
            return None
        return zstandard.ZstdCompressor(level=self.level, write_content_size=True, write_checksum=False)


def as_bytes_view(raw) -> memoryview:
    view = raw if isinstance(raw, memoryview) else memoryview(raw)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def encode_payload(compressor: zstandard.ZstdCompressor | None, raw, *, sample: bool = True,
                   page_size: int = 0) -> tuple[int, bytes | memoryview]:
    """``(flags, body)``: zstd-compressed when that saves at least 1/64, else the raw bytes.
    ``sample=False``: the caller sampled already (``worth_compressing``). With ``page_size``, a
    batch worth compressing leaves its zero pages out (flag ZEROS)."""
    view = as_bytes_view(raw)
    if compressor is None or (sample and not worth_compressing(compressor, view)):
        return 0, view
    if page_size and not page_size % ZERO_SCAN_UNIT and not len(view) % page_size:
        bitmap, zero = zero_bitmap(view, page_size)
        if zero:
            return _encode_without_zeros(compressor, view, page_size, bitmap, zero)
    packed = compressor.compress(view)
    if len(packed) > len(view) - (len(view) >> 6):
        return 0, view
    return F_ZSTD, packed


def zero_bitmap(view, page_size: int) -> tuple[bytearray, int]:
    """The zero-page bitmap of ``view`` (bit i, least significant first, set when page i is all
    zero) and how many bits are set. ``page_size`` must be a multiple of ZERO_SCAN_UNIT."""
    pages = len(view) // page_size
    bitmap = bytearray(_bitmap_size(pages))
    zero = lib.find_zero_pages(_ptr(view), pages, page_size, _ptr(bitmap))
    return bitmap, zero


def _encode_without_zeros(compressor, view: memoryview, page_size: int, bitmap: bytearray, zero: int):
    pages = len(view) // page_size
    body = bytearray(len(bitmap) + (pages - zero) * page_size)
    kept = memoryview(body)[len(bitmap):]
    body[: len(bitmap)] = bitmap
    lib.gather_pages(_ptr(view), pages, page_size, _ptr(bitmap), _ptr(kept))
    flags, packed = encode_payload(compressor, kept)    # what is left may not compress
    if flags & F_ZSTD:
        return F_ZEROS | F_ZSTD, bytes(bitmap) + packed
    return F_ZEROS, body


def _bitmap_size(pages: int) -> int:
    return (pages + 7) // 8


def _ptr(buffer):
    return ffi.from_buffer("uint8_t[]", buffer)


def worth_compressing(compressor: zstandard.ZstdCompressor, raw) -> bool:
    """False when ``raw`` is large enough to be sampled and no sample shrinks: it will go raw."""
    view = as_bytes_view(raw)
    return len(view) < SAMPLED_FROM or _samples_shrink(compressor, view)


def _samples_shrink(compressor: zstandard.ZstdCompressor, view: memoryview) -> bool:
    size = len(view)
    for start in (0, size // 3, 2 * size // 3, size - SAMPLE):
        if len(compressor.compress(view[start : start + SAMPLE])) < SAMPLE - (SAMPLE >> 4):
            return True
    return False


def decode_payload(decompressor: zstandard.ZstdDecompressor, flags: int, body, raw_len: int,
                   page_size: int = 0) -> bytes | bytearray | memoryview:
    """The raw pages; refuses a body that does not expand to exactly ``raw_len`` bytes.

    Raises LocalProtocolError (the Connection reports it as the peer's fault).
    """
    if flags & F_ZEROS:
        return _decode_without_zeros(decompressor, flags & ~F_ZEROS, as_bytes_view(body), raw_len, page_size)
    if not flags & F_ZSTD:
        if len(body) != raw_len:
            raise LocalProtocolError(f"raw payload of {len(body)} bytes, the runs need {raw_len}")
        return body
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise LocalProtocolError(f"compressed payload has no valid zstd frame header ({exc})") from None
    if declared != raw_len:
        raise LocalProtocolError(f"compressed payload declares {declared} bytes, the runs need {raw_len}")
    try:
        raw = decompressor.decompress(body, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise LocalProtocolError(f"compressed payload does not decompress: {exc}") from None
    if len(raw) != raw_len:
        raise LocalProtocolError(f"compressed payload expands to {len(raw)} bytes, the runs need {raw_len}")
    return raw


def _decode_without_zeros(decompressor, flags: int, body: memoryview, raw_len: int, page_size: int) -> bytearray:
    if page_size <= 0 or raw_len % page_size:
        raise LocalProtocolError(f"zero-page bitmap on a payload of {raw_len} bytes, not whole pages of {page_size}")
    pages = raw_len // page_size
    size = _bitmap_size(pages)
    if len(body) < size:
        raise LocalProtocolError(f"payload of {len(body)} bytes is shorter than its zero-page bitmap ({size} bytes)")
    bitmap = body[:size]
    if pages % 8 and bitmap[-1] >> (pages % 8):
        raise LocalProtocolError(f"zero-page bitmap marks pages past the batch's {pages}")
    zero = int.from_bytes(bitmap, "little").bit_count()
    kept = decode_payload(decompressor, flags, body[size:], (pages - zero) * page_size)
    raw = bytearray(raw_len)
    lib.scatter_pages(_ptr(kept), pages, page_size, _ptr(bitmap), _ptr(raw))
    return raw
