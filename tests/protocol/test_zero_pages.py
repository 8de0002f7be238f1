"""Zero pages are left out of compressed Pages payloads (flag ZEROS) and restored on receipt."""

import random

import pytest
import zstandard

from migrator.protocol import Pages
from migrator.protocol._frames import F_ZEROS, F_ZSTD, HEADER
from migrator.protocol._payload import encode_payload, zero_bitmap
from migrator.protocol._wire import encode_meta

from .helpers import LAYOUT, PS, D, S, ConnectionPair, craft
from .test_malformed import opened, refuses

BASE = LAYOUT.regions[0].start
TEXT_PAGE = (b"the quick brown fox jumps over the lazy dog. " * 100)[:PS]


def payload(pattern: str) -> bytes:
    """A page per character: z zero, r random (each different), t text."""
    rng = random.Random(7)
    return b"".join(rng.randbytes(PS) if c == "r" else {"z": bytes(PS), "t": TEXT_PAGE}[c] for c in pattern)


def frame_flags(frame: bytes) -> int:
    return HEADER.unpack_from(frame)[3]


@pytest.mark.parametrize("pattern, flags", [
    ("zrzrzrzrzrzrzrzrzrzr", F_ZEROS),              # the zero pages go, the random ones go raw
    ("ztztztzzzzzzzzzzzzzz", F_ZEROS | F_ZSTD),     # the rest still compresses
    ("z" * 20, F_ZEROS),                              # nothing but the bitmap
    ("t" * 20, F_ZSTD),                               # no zero page: no bitmap
    ("z" + "r" * 31, F_ZEROS),                        # one zero page in random data, when sampled
])
def test_zero_pages_travel_as_a_bitmap(pattern, flags):
    p = ConnectionPair(compress="zstd:1")
    p.open()
    event = Pages(round=1, runs=((BASE, len(pattern)),), payload=payload(pattern))
    frame = p.conn[S].send(event)
    kept = pattern.count("r") * PS
    assert frame_flags(frame) & (F_ZEROS | F_ZSTD) == flags
    assert len(frame) < kept + PS if flags & F_ZEROS else True
    p.conn[D].receive_data(frame)
    assert p.conn[D].next_event() == event


def test_zero_bitmap_marks_each_zero_page():
    assert zero_bitmap(payload("zrtz"), PS) == (b"\x09", 2)
    assert zero_bitmap(payload("z" * 9 + "t"), PS) == (b"\xff\x01", 9)
    nearly = bytearray(PS)
    nearly[-1] = 1                     # the last word of a page counts too
    assert zero_bitmap(bytes(nearly) + bytes(PS), PS) == (b"\x02", 1)


def test_no_elision_without_compression_or_for_incompressible_batches():
    p = ConnectionPair(compress="none")
    p.open()
    frame = p.conn[S].send(Pages(round=0, runs=((BASE, 4),), payload=payload("zzzz")))
    assert not frame_flags(frame) & F_ZEROS
    # Sampled as incompressible (pieces at 0, 1/3, 2/3 and the end are random): raw, as before.
    flags, body = encode_payload(zstandard.ZstdCompressor(), payload("r" * 20 + "z" + "r" * 11), page_size=PS)
    assert (flags, len(body)) == (0, 32 * PS)


NINE = encode_meta(Pages(round=0, runs=((BASE, 9),), payload=bytes(9 * PS)))   # a 2-byte bitmap


@pytest.mark.parametrize("body, flags, words", [
    (b"\x05", F_ZEROS, "payload of 1 bytes is shorter than its zero-page bitmap \\(2 bytes\\)"),
    (b"\x00\xfe", F_ZEROS, "marks pages past the batch's 9"),
    (b"\x01\x00" + b"x" * (9 * PS), F_ZEROS, "raw payload of 36864 bytes, the runs need 32768"),
    (b"\x01\x00" + zstandard.ZstdCompressor().compress(bytes(9 * PS)), F_ZEROS | F_ZSTD,
     "declares 36864 bytes, the runs need 32768"),
    (b"\xff\x01" + b"x", F_ZEROS, "raw payload of 1 bytes, the runs need 0"),
])
def test_lying_zero_page_bitmaps_are_refused(body, flags, words):
    p = opened()
    refuses(p.conn[D], craft(Pages, NINE, seq=3, body=body, flags=flags), words)


def test_a_bitmap_that_leaves_out_every_page_is_accepted():
    p = opened()
    p.conn[D].receive_data(craft(Pages, NINE, seq=3, body=b"\xff\x01", flags=F_ZEROS))
    assert p.conn[D].next_event().payload == bytes(9 * PS)


def test_a_peer_that_does_not_say_it_reads_zero_bitmaps_gets_whole_pages():
    """An older destination would refuse the ZEROS flag: without its Hello's feature, none."""
    p = ConnectionPair(compress="zstd:1")
    p.open(dest_features=("zstd",))
    event = Pages(round=0, runs=((BASE, 20),), payload=payload("zt" * 10))
    frame = p.conn[S].send(event)
    assert frame_flags(frame) & (F_ZEROS | F_ZSTD) == F_ZSTD
    p.conn[D].receive_data(frame)
    assert p.conn[D].next_event() == event


def test_a_payload_of_partial_pages_keeps_every_byte():
    raw = bytes(3 * PS + 100)
    flags, body = encode_payload(zstandard.ZstdCompressor(), raw, page_size=PS)
    assert not flags & F_ZEROS and zstandard.ZstdDecompressor().decompress(body) == raw
