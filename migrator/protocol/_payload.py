"""Page payload compression: pure functions, safe to call from worker threads.

zstd compressors and decompressors are not thread-safe, so callers pass their own (one per
thread); everything else here is immutable. A batch that zstd cannot shrink by at least 1/64
goes raw (no ZSTD flag). Before compressing a large batch, a few sampled pages are tried one by
one: if none of them shrinks, the batch goes raw without the full attempt (random or encrypted
pages then cost a few microseconds, not a pass of zstd over a megabyte).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import zstandard

from ..errors import LocalProtocolError
from ._frames import F_ZSTD

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


def encode_payload(compressor: zstandard.ZstdCompressor | None, raw, *, sample: bool = True) -> tuple[int, bytes | memoryview]:
    """``(flags, body)``: zstd-compressed when that saves at least 1/64, else the raw bytes.
    ``sample=False``: the caller sampled already (``worth_compressing``)."""
    view = as_bytes_view(raw)
    if compressor is None or (sample and not worth_compressing(compressor, view)):
        return 0, view
    packed = compressor.compress(view)
    if len(packed) > len(view) - (len(view) >> 6):
        return 0, view
    return F_ZSTD, packed


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


def decode_payload(decompressor: zstandard.ZstdDecompressor, flags: int, body, raw_len: int) -> bytes | memoryview:
    """The raw pages; refuses a body that does not expand to exactly ``raw_len`` bytes.

    Raises LocalProtocolError (the Connection reports it as the peer's fault).
    """
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
