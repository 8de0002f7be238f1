"""Page payload compression: pure functions, safe to call from worker threads.

zstd compressors and decompressors are not thread-safe, so callers pass their own (one per
thread); everything else here is immutable. A batch that zstd cannot shrink by at least 1/64
goes raw (no ZSTD flag). Before compressing a large batch, a few sampled pages are tried one by
one: if none of them shrinks, the batch goes raw without the full attempt (random or encrypted
pages then cost a few microseconds, not a pass of zstd over a megabyte).

Zero pages of a batch worth compressing are left out (flag ZEROS), as QEMU's multifd zero-page
detection does: the payload starts with a bitmap, bit i set when page i is all zero, followed by
the other pages, raw or compressed on their own. Finding them costs a ~50 ns compare per page;
zstd would spend far longer on a batch that mixes zero pages with incompressible ones (on
half-zero random data it runs at ~1.6 GB/s, against ~5 GB/s on random data alone), and the
receiver would decompress them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import zstandard

from ..errors import LocalProtocolError
from ._frames import F_ZEROS, F_ZSTD

MIN_LEVEL, MAX_LEVEL = -100, 22
SAMPLE = 4096          # bytes per sampled piece
SAMPLED_FROM = 64 << 10  # batches at least this large are sampled first


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
    if page_size:
        marks = zero_marks(view, page_size)
        if "1" in marks:
            return _encode_without_zeros(compressor, view, page_size, marks)
    packed = compressor.compress(view)
    if len(packed) > len(view) - (len(view) >> 6):
        return 0, view
    return F_ZSTD, packed


def zero_marks(view: memoryview, page_size: int) -> str:
    """One character per page of ``view``: "1" where the page is all zero, else "0"."""
    is_zero = bytes(page_size).startswith    # a memcmp that stops at the first non-zero byte
    return "".join("1" if is_zero(view[at : at + page_size]) else "0" for at in range(0, len(view), page_size))


def _encode_without_zeros(compressor, view: memoryview, page_size: int, marks: str) -> tuple[int, bytes]:
    bitmap = int(marks[::-1], 2).to_bytes(_bitmap_size(len(marks)), "little")
    kept = [view[m.start() * page_size : m.end() * page_size] for m in re.finditer("0+", marks)]
    body = b"".join([bitmap, *kept])
    flags, packed = encode_payload(compressor, memoryview(body)[len(bitmap):])   # the rest may not compress
    if flags & F_ZSTD:
        return F_ZEROS | F_ZSTD, bitmap + packed
    return F_ZEROS, body


def _bitmap_size(pages: int) -> int:
    return (pages + 7) // 8


_zero_block = b""


def _zeros(size: int) -> memoryview:
    """``size`` zero bytes, from one block shared by every thread (grown when needed; a racing
    thread at worst allocates its own)."""
    global _zero_block
    block = _zero_block
    if len(block) < size:
        block = _zero_block = bytes(size)
    return memoryview(block)[:size]


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
                   page_size: int = 0) -> bytes | memoryview:
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


def _decode_without_zeros(decompressor, flags: int, body: memoryview, raw_len: int, page_size: int) -> bytes:
    if page_size <= 0 or raw_len % page_size:
        raise LocalProtocolError(f"zero-page bitmap on a payload of {raw_len} bytes, not whole pages of {page_size}")
    pages = raw_len // page_size
    size = _bitmap_size(pages)
    if len(body) < size:
        raise LocalProtocolError(f"payload of {len(body)} bytes is shorter than its zero-page bitmap ({size} bytes)")
    bits = int.from_bytes(body[:size], "little")
    if bits >> pages:
        raise LocalProtocolError(f"zero-page bitmap marks pages past the batch's {pages}")
    marks = format(bits, f"0{pages}b")[::-1]
    kept = memoryview(decode_payload(decompressor, flags, body[size:], marks.count("0") * page_size))
    zeros = _zeros(raw_len)
    pieces, at = [], 0
    for run in re.finditer("0+|1+", marks):
        length = (run.end() - run.start()) * page_size
        if marks[run.start()] == "1":
            pieces.append(zeros[:length])
        else:
            pieces.append(kept[at : at + length])
            at += length
    return b"".join(pieces)
