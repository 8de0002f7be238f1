"""The trace file: ``migrator track --record`` writes it, ``trace show`` and ``predict`` read it.

Layout (documented in docs/trace-format.md): the 8 bytes ``MIGTRACE``, then one zstd frame
holding one msgpack map::

    {"version": 1, "page_size": int, "pid": int, "command": str, "interval_s": float,
     "stopped_ms": float,
     "mappings":  [[start, end, path], ...],            # every mapping ever tracked, by index
     "untracked": [[start, end, path, reason], ...],
     "intervals": [[t, seconds, [mapping index, ...],   # tracked during the interval
                    [[mapping index, [first, pages, first, pages, ...]], ...]], ...]}

``first`` is a page offset from the mapping's start; runs are sorted and do not overlap.
Every byte is hostile: the decompressed size is bounded, msgpack is decoded with no extension
types, and every field is checked (types, alignment, runs inside their mapping, indices in
range, time not going backwards) before a ``Trace`` exists. Any fault is one ``TraceError``.
"""

from __future__ import annotations

import io
import math
import os

import msgpack
import zstandard

from ..core.errors import TraceError
from ..core.files import open_output
from .model import Trace, TraceInterval, TraceMapping, UntrackedMapping

MAGIC = b"MIGTRACE"
VERSION = 1
MAX_DECODED = 1 << 30   # bytes of msgpack a trace may expand to
_FIELDS = ("version", "page_size", "pid", "command", "interval_s", "stopped_ms", "mappings", "untracked", "intervals")


def encode(trace: Trace) -> bytes:
    shift = trace.page_size.bit_length() - 1
    intervals = []
    for interval in trace.intervals:
        written = []
        for index, runs in interval.written:
            base = trace.mappings[index].start
            flat: list[int] = []
            for address, pages in runs:
                flat += [(address - base) >> shift, pages]
            written.append([index, flat])
        intervals.append([interval.t, interval.seconds, list(interval.mappings), written])
    document = {
        "version": VERSION, "page_size": trace.page_size, "pid": trace.pid, "command": trace.command,
        "interval_s": trace.interval_s, "stopped_ms": trace.stopped_ms,
        "mappings": [[m.start, m.end, m.path] for m in trace.mappings],
        "untracked": [[u.start, u.end, u.path, u.reason] for u in trace.untracked],
        "intervals": intervals,
    }
    return MAGIC + zstandard.ZstdCompressor(level=3).compress(msgpack.packb(document))


def write_trace(path: str | os.PathLike, trace: Trace) -> None:
    with open_output(path) as f:
        f.write(encode(trace))


def read_trace(path: str | os.PathLike) -> Trace:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DECODED)
    except OSError as exc:
        raise TraceError(f"cannot read trace {os.fspath(path)}: {exc.strerror}") from None
    try:
        return decode(data)
    except TraceError as exc:
        raise TraceError(f"{os.fspath(path)}: {exc}") from None


def decode(data: bytes) -> Trace:
    if not data.startswith(MAGIC):
        raise TraceError("not a migrator trace (no MIGTRACE header)")
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data[len(MAGIC):]))
        raw = reader.read(MAX_DECODED + 1)
    except zstandard.ZstdError as exc:
        raise TraceError(f"corrupt trace: zstd: {exc}") from None
    if len(raw) > MAX_DECODED:
        raise TraceError(f"trace expands beyond {MAX_DECODED} bytes")
    try:
        document = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except TraceError:
        raise
    except Exception as exc:   # msgpack raises several unrelated types for malformed input
        raise TraceError(f"corrupt trace: msgpack: {type(exc).__name__}") from None
    return _validate(document)


def _no_ext(code, data):
    raise TraceError("corrupt trace: msgpack extension types are not allowed")


def _int(value, what: str, least: int = 0, most: int = (1 << 64) - 1) -> int:
    if type(value) is not int or not least <= value <= most:
        raise TraceError(f"{what} must be a whole number in [{least}, {most}], not {value!r:.40}")
    return value


def _float(value, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise TraceError(f"{what} must be a finite number >= 0, not {value!r:.40}")
    return float(value)


def _list(value, what: str, length: int | None = None) -> list:
    if type(value) is not list or (length is not None and len(value) != length):
        raise TraceError(f"{what} must be a list" + (f" of {length}" if length is not None else ""))
    return value


def _str(value, what: str) -> str:
    if type(value) is not str or len(value) > 4096:
        raise TraceError(f"{what} must be a text of at most 4096 characters")
    return value


def _validate(document) -> Trace:
    if type(document) is not dict:
        raise TraceError("corrupt trace: the document is not a map")
    if document.get("version") != VERSION:
        raise TraceError(f"trace version {document.get('version')!r:.20} is not supported (this migrator reads {VERSION})")
    missing = [name for name in _FIELDS if name not in document]
    if missing or len(document) != len(_FIELDS):
        raise TraceError(f"corrupt trace: fields missing {missing} or unknown ones present")
    page_size = _int(document["page_size"], "page_size", 512, 1 << 30)
    if page_size & (page_size - 1):
        raise TraceError(f"page_size {page_size} is not a power of two")
    shift = page_size.bit_length() - 1
    mappings = []
    for n, item in enumerate(_list(document["mappings"], "mappings")):
        start, end, path = _list(item, f"mapping {n}", 3)
        start, end = _int(start, f"mapping {n} start"), _int(end, f"mapping {n} end")
        if start % page_size or end % page_size or end <= start:
            raise TraceError(f"mapping {n} [{start:#x}, {end:#x}) is empty or not page aligned")
        mappings.append(TraceMapping(start, end, _str(path, f"mapping {n} path")))
    untracked = []
    for n, item in enumerate(_list(document["untracked"], "untracked")):
        start, end, path, reason = _list(item, f"untracked {n}", 4)
        start, end = _int(start, f"untracked {n} start"), _int(end, f"untracked {n} end")
        if end < start:
            raise TraceError(f"untracked {n} ends before it starts")
        untracked.append(UntrackedMapping(start, end, _str(path, "path"), _str(reason, "reason")))
    intervals = []
    last_t = 0.0
    for n, item in enumerate(_list(document["intervals"], "intervals")):
        t, seconds, tracked, written = _list(item, f"interval {n}", 4)
        t, seconds = _float(t, f"interval {n} t"), _float(seconds, f"interval {n} seconds")
        if t < last_t or seconds > t + 1e-9:
            raise TraceError(f"interval {n} goes back in time (t={t}, seconds={seconds})")
        last_t = t
        ids = tuple(_int(i, f"interval {n} mapping index", 0, len(mappings) - 1) for i in _list(tracked, "tracked"))
        runs_of = []
        seen = set()
        for entry in _list(written, f"interval {n} written"):
            index, flat = _list(entry, f"interval {n} written entry", 2)
            index = _int(index, f"interval {n} written mapping index", 0, len(mappings) - 1)
            if index in seen:
                raise TraceError(f"interval {n} lists mapping {index} twice")
            seen.add(index)
            mapping = mappings[index]
            size = (mapping.end - mapping.start) >> shift
            flat = _list(flat, f"interval {n} runs")
            if len(flat) % 2:
                raise TraceError(f"interval {n} runs of mapping {index} are not (first, pages) pairs")
            runs = []
            position = 0
            for first, pages in zip(flat[0::2], flat[1::2]):
                first, pages = _int(first, "run first", 0, size), _int(pages, "run pages", 1, size)
                if first < position or first + pages > size:
                    raise TraceError(f"interval {n}: a run of mapping {index} overlaps another or leaves the mapping")
                position = first + pages
                runs.append((mapping.start + (first << shift), pages))
            runs_of.append((index, tuple(runs)))
        intervals.append(TraceInterval(t=t, seconds=seconds, mappings=ids, written=tuple(sorted(runs_of))))
    return Trace(
        page_size=page_size, pid=_int(document["pid"], "pid", 0, 1 << 31), command=_str(document["command"], "command"),
        interval_s=_float(document["interval_s"], "interval_s"), stopped_ms=_float(document["stopped_ms"], "stopped_ms"),
        mappings=tuple(mappings), untracked=tuple(untracked), intervals=tuple(intervals),
    )
