"""Trace files: round trips, summaries, and hostile files refused in one line."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest
import zstandard

from migrator.core.errors import TraceError
from migrator.trace.file import MAGIC, decode, encode, read_trace, write_trace
from migrator.trace.model import TraceMapping, TraceRecorder, UntrackedMapping
from migrator.trace.summary import summarize

PAGE = 4096
HEAP = TraceMapping(0x10000, 0x10000 + 16 * PAGE, "[heap]")
ANON = TraceMapping(0x7F0000000000, 0x7F0000000000 + 8 * PAGE, "")


def sample():
    recorder = TraceRecorder(page_size=PAGE, pid=42, command="prog --x", interval_s=0.1, stopped_ms=0.5,
                             untracked=[UntrackedMapping(0x5000, 0x6000, "/bin/prog", "writable private file mapping")])
    recorder.add(0.1, 0.1, [HEAP], [(HEAP, [(HEAP.start, 2), (HEAP.start + 5 * PAGE, 1)])])
    recorder.add(0.2, 0.1, [HEAP, ANON], [(HEAP, [(HEAP.start, 1)]), (ANON, [(ANON.start + PAGE, 7)])])
    recorder.add(0.3, 0.1, [ANON], [])
    return recorder.trace()


def test_round_trip(tmp_path):
    trace = sample()
    path = tmp_path / "t.trace"
    write_trace(path, trace)
    assert read_trace(path) == trace


def test_summary_counts_rate_and_working_set():
    summary = summarize(sample())
    assert [i["dirty_pages"] for i in summary["intervals"]] == [3, 8, 0]
    assert summary["dirty_rate"] == pytest.approx(11 / 0.3, abs=1e-3)
    assert summary["wss_pages"] == 3 + 7
    assert summary["intervals"][1]["mappings"] == {"anon@0x7f0000000000": 7, "[heap]": 1}
    assert summary["untracked"][0]["size"] == 0x1000 and summary["stopped_ms"] == 0.5


def document(**changes):
    doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(encode(sample())[len(MAGIC):]))
    doc.update(changes)
    return doc


def pack(doc) -> bytes:
    return MAGIC + zstandard.ZstdCompressor().compress(msgpack.packb(doc))


HOSTILE = {
    "empty": b"",
    "no magic": b"NOTATRACE" + b"\0" * 20,
    "not zstd": MAGIC + b"\x00\x01garbage",
    "truncated": encode(sample())[:-5],
    "not a map": pack([1, 2, 3]),
    "version 2": pack(document(version=2)),
    "unknown field": pack(document(extra=1)),
    "missing field": pack({k: v for k, v in document().items() if k != "intervals"}),
    "page size not a power of two": pack(document(page_size=3000)),
    "unaligned mapping": pack(document(mappings=[[0x10001, 0x20000, ""], [0x7F0000000000, 0x7F0000008000, ""]])),
    "run outside its mapping": pack(document(intervals=[[0.1, 0.1, [0], [[0, [15, 2]]]]])),
    "overlapping runs": pack(document(intervals=[[0.1, 0.1, [0], [[0, [0, 3, 2, 1]]]]])),
    "odd run list": pack(document(intervals=[[0.1, 0.1, [0], [[0, [0]]]]])),
    "index out of range": pack(document(intervals=[[0.1, 0.1, [9], []]])),
    "time going back": pack(document(intervals=[[0.2, 0.1, [0], []], [0.1, 0.05, [0], []]])),
    "negative time": pack(document(intervals=[[-1.0, 0.1, [0], []]])),
    "nan": pack(document(stopped_ms=float("nan"))),
    "bool for int": pack(document(pid=True)),
    "huge path": pack(document(command="x" * 10000)),
    "extension type": MAGIC + zstandard.ZstdCompressor().compress(msgpack.packb(msgpack.ExtType(1, b"x"))),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_files_are_refused_with_a_trace_error(name):
    with pytest.raises(TraceError):
        decode(HOSTILE[name])


def test_a_decompression_bomb_is_refused(monkeypatch):
    import migrator.trace.file as trace_file

    monkeypatch.setattr(trace_file, "MAX_DECODED", 1 << 16)
    bomb = MAGIC + zstandard.ZstdCompressor().compress(msgpack.packb({"version": 1, "command": "x" * (1 << 17)}))
    with pytest.raises(TraceError, match="expands beyond"):
        decode(bomb)


def migrator(*args):
    return subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True, timeout=60)


def test_trace_show(tmp_path):
    path = tmp_path / "t.trace"
    write_trace(path, sample())
    result = migrator("trace", "show", str(path), "--intervals")
    assert result.returncode == 0, result.stderr
    assert "process 42 prog --x" in result.stdout and "working set 10 pages" in result.stdout
    assert "untracked 0x5000-0x6000 4 KiB /bin/prog" in result.stdout
    assert len([line for line in result.stdout.splitlines() if "dirty" in line and "wss" in line]) == 3


@pytest.mark.parametrize("name", ["no magic", "truncated", "run outside its mapping"])
def test_trace_show_refuses_a_hostile_file_in_one_line(tmp_path, name):
    path = tmp_path / "bad.trace"
    path.write_bytes(HOSTILE[name])
    result = migrator("trace", "show", str(path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"migrator: TraceError: {path}: ")
    assert migrator("trace", "show", str(tmp_path / "missing")).stderr.startswith("migrator: TraceError: cannot read")
