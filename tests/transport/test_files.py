"""Checkpoint images: round trip, atomic commit, and refusal of truncated or corrupted files."""

import os
import stat

import msgpack
import pytest
import trio

from migrator.core.errors import ImageError
from migrator.protocol import Digest, DigestKind, Freeze, Hello, Index, IndexEntry, Layout, Pages, RoundEnd
from migrator.protocol._frames import CHECKSUM, TYPE_CODES, assemble
from migrator.protocol._wire import encode_meta
from migrator.transport import open_file_reader, open_file_writer
from migrator.transport.files import TRAILER, TRAILER_MAGIC

from .helpers import LAYOUT, PS, TOKEN, page_batch, zero_batch


def events():
    out = [LAYOUT]
    for i in range(12):
        out.append(zero_batch(i) if i % 5 == 0 else page_batch(i, kind=("text", "random", "zero", "half-zero")[i % 4]))
    out += [RoundEnd(round=0, pages=99), Freeze(round=1), page_batch(3), RoundEnd(round=1, pages=1, final=True),
            Digest(kind=DigestKind.PAGES, value=b"v" * 16)]
    return out


async def write_image(path, token=None, compress="zstd:1", threads=2):
    async with await open_file_writer(path, token=token, compress=compress, threads=threads) as writer:
        for event in events():
            await writer.send(event)
    return writer


async def read_all(path, token=None):
    async with await open_file_reader(path, token=token) as reader:
        return reader, [event async for event in reader]


@pytest.mark.parametrize("token, compress", [(None, "zstd:1"), (TOKEN, "zstd:3"), (TOKEN, "none")])
async def test_image_round_trip_and_index(tmp_path, token, compress):
    path = str(tmp_path / "guest.img")
    writer = await write_image(path, token, compress)
    assert writer.sealed and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["guest.img"], "no temporary file is left behind"
    reader, got = await read_all(path, token)
    assert got == events()
    assert reader.hello.recorded and reader.hello.auth is (token is not None)
    kinds = [e.kind for e in reader.entries]
    assert kinds[:2] == ["Hello", "Layout"] and kinds[-1] == "Digest"
    assert kinds.count("Pages") == sum(isinstance(e, Pages) for e in events())
    assert sum(e.pages for e in reader.entries if e.kind == "Pages") == sum(e.pages for e in got if isinstance(e, Pages))
    assert {e.pages for e in reader.entries if e.kind == "RoundEnd"} == {0}, "an entry counts the pages its frame holds"
    end = reader.entries[-1].offset + reader.entries[-1].length
    assert os.path.getsize(path) > end and reader.statistics().bytes_raw_received > 0


async def test_nothing_appears_until_commit_and_a_failed_writer_leaves_nothing(tmp_path):
    path = str(tmp_path / "img")
    writer = await open_file_writer(path, token=None)
    await writer.send(LAYOUT)
    await writer.flush()
    assert not os.path.exists(path)
    [partial] = os.listdir(tmp_path)
    assert partial.startswith(".img.") and partial.endswith(".partial")
    writer.discard()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        async with await open_file_writer(path, token=None) as writer:
            await writer.send(LAYOUT)
            raise RuntimeError("the engine failed")
    assert os.listdir(tmp_path) == []


async def test_writer_refuses_what_the_protocol_refuses(tmp_path):
    from migrator.core.errors import LocalProtocolError

    writer = await open_file_writer(str(tmp_path / "x"), token=None)
    with pytest.raises(LocalProtocolError, match="Pages from source is not allowed in state READY"):
        await writer.send(page_batch(0))
    with pytest.raises(ImageError, match="the stream failed earlier; the image is not sealed"):
        await writer.aclose()
    assert os.listdir(tmp_path) == []


async def test_truncated_image_is_refused_naming_file_and_offset(tmp_path):
    path = str(tmp_path / "img")
    await write_image(path)
    data = open(path, "rb").read()
    for size in [0, 10, len(data) // 2, len(data) - TRAILER.size, len(data) - 1]:
        cut = str(tmp_path / f"cut{size}")
        with open(cut, "wb") as f:
            f.write(data[:size])
        with pytest.raises(ImageError, match=f"{cut}: incomplete image: .*offset {max(size - TRAILER.size, 0)}"):
            await open_file_reader(cut, token=None)


async def test_corrupted_image_is_refused_at_the_bad_frame(tmp_path):
    path = str(tmp_path / "img")
    await write_image(path)
    reader, _ = await read_all(path)
    victim = [e for e in reader.entries if e.kind == "Pages"][-1]   # the one after Freeze
    with open(path, "r+b") as f:
        f.seek(victim.offset + 60)
        byte = f.read(1)
        f.seek(victim.offset + 60)
        f.write(bytes([byte[0] ^ 0x40]))
    async with await open_file_reader(path, token=None) as reader:
        got = []
        with pytest.raises(ImageError, match=f"{path}: .*frame .* at byte {victim.offset} fails its checksum"):
            async for event in reader:
                got.append(event)
    assert got == events()[: len(got)] and len(got) == 15   # everything before the bad frame


async def test_index_and_token_are_checked_when_opening(tmp_path):
    path = str(tmp_path / "img")
    await write_image(path, token=TOKEN)
    with pytest.raises(ImageError, match="recorded with a different token"):
        await open_file_reader(path, token=b"not-the-token-used-to-write")
    with pytest.raises(ImageError, match="authenticates with a token, but this side has none"):
        await open_file_reader(path, token=None)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - TRAILER.size - 3)   # inside the Index frame's MAC
        f.write(b"\0\0\0")
    with pytest.raises(ImageError, match=f"{path}: frame at byte \\d+ fails its MAC"):
        await open_file_reader(path, token=TOKEN)
    with pytest.raises(ImageError, match="No such file"):
        await open_file_reader(str(tmp_path / "missing"), token=None)


async def test_reader_reads_large_images_in_chunks(tmp_path):
    path = str(tmp_path / "big")
    async with await open_file_writer(path, token=None, compress="zstd:1") as writer:
        await writer.send(LAYOUT)
        for i in range(64):
            await writer.send(page_batch(i, pages=64, kind="random" if i % 2 else "text"))   # 16 MiB
    with trio.fail_after(30):
        _, got = await read_all(path)
    assert len(got) == 65 and got[-1] == page_batch(63, pages=64, kind="random")


def _version_1_stream() -> bytes:
    """An image stream as a migrator of protocol version 1 wrote it: a Hello of version 1, then
    control frames of the version-1 shape (RoundEnd and Digest with their ``stats`` maps)."""
    v1 = [
        (Hello, {"version": 1, "page_size": PS, "features": ["zstd"], "streams": 1, "auth": False, "recorded": True,
                 "nonce": b"n" * 16, "session": b"", "stream": 0, "proof": b""}),
        (Layout, encode_meta(LAYOUT)),
        (RoundEnd, {"round": 0, "stats": {"pages": 0}}),
        (Freeze, {"round": 1}),
        (RoundEnd, {"round": 1, "stats": {"pages": 0, "final": True}}),
        (Digest, {"kind": "pages", "value": b"v" * 16, "stats": {"last": True}}),
    ]
    frames = []
    for seq, (kind, fields) in enumerate(v1):
        meta = fields if isinstance(fields, bytes) else msgpack.packb(fields, use_bin_type=True)
        frames.append(assemble(TYPE_CODES[kind], 0, seq, meta, b"", CHECKSUM))
    entries, offset = [], 0
    for (kind, _), frame in zip(v1, frames):
        entries.append(IndexEntry(offset=offset, length=len(frame), kind=kind.__name__))
        offset += len(frame)
    index = assemble(TYPE_CODES[Index], 0, len(frames), encode_meta(Index(entries=tuple(entries))), b"", CHECKSUM)
    return b"".join(frames) + index + TRAILER.pack(TRAILER_MAGIC, offset, len(frames))


async def test_an_image_of_protocol_version_1_is_refused_in_one_line(tmp_path):
    path = tmp_path / "old.mgrt"
    path.write_bytes(_version_1_stream())
    with pytest.raises(ImageError) as refused:
        await open_file_reader(str(path), token=None)
    assert str(refused.value) == f"{path}: the image was recorded with protocol version 1; this migrator reads version 2 only"
