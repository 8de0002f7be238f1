"""Control protocol parsing: every malformed request gets a one-line reason."""

from __future__ import annotations

import array
import base64
import json

import pytest

from migrator.core.errors import GuestError
from migrator.guest.control import LineBuffer, Request, decode_pages, encode, encode_pages, error_reply, ok_reply, parse_reply, parse_request


def test_parse_valid_requests():
    assert parse_request(b'{"cmd": "stats"}') == Request("stats", {})
    assert parse_request(b'{"cmd":"attach","tracker":"sync-wp"}\r') == Request("attach", {"tracker": "sync-wp"})
    assert parse_request(b'{"cmd":"pause","at_step":12}') == Request("pause", {"at_step": 12})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{nope", "bad JSON"),
        (b"\xff\xfe{}", "bad JSON"),
        (b"", "bad JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"command": "stats"}', 'needs a "cmd" string'),
        (b'{"cmd": 3}', 'needs a "cmd" string'),
        (b'{"cmd": "reboot"}', "unknown command 'reboot'"),
        (b'{"cmd": "stats", "x": 1}', "stats: unknown argument 'x'"),
        (b'{"cmd": "pause", "at_step": "5"}', "at_step must be an integer"),
        (b'{"cmd": "pause", "at_step": true}', "at_step must be an integer"),
        (b'{"cmd": "pause", "at_step": 1.5}', "at_step must be an integer"),
        (b'{"cmd": "resume", "until_step": -1}', "until_step must not be negative"),
        (b'{"cmd": "set-tag"}', "set-tag: missing argument 'tag'"),
        (b'{"cmd": "set-tag", "tag": 7}', "tag must be a string"),
    ],
)
def test_parse_rejects_with_a_reason(line, message):
    with pytest.raises(GuestError, match=message.replace("(", r"\(")):
        parse_request(line)


def test_replies_are_one_json_line():
    assert json.loads(ok_reply(steps=3)) == {"ok": True, "steps": 3}
    line = error_reply("two\nlines")
    assert line.count(b"\n") == 1 and json.loads(line) == {"ok": False, "error": "two lines"}
    assert parse_reply(encode({"ok": False, "error": "x"})) == {"ok": False, "error": "x"}
    with pytest.raises(GuestError, match='"ok" boolean'):
        parse_reply(b'{"steps": 1}')


def test_line_buffer_splits_and_bounds_lines():
    lines = LineBuffer(max_line=10)
    assert lines.feed(b'{"a"') == []
    assert lines.feed(b':1}\n{}\n{') == [b'{"a":1}', b"{}"]
    with pytest.raises(GuestError, match="longer than 10 bytes"):
        lines.feed(b"x" * 11)


def test_check_pages_travel_as_base64_pairs_and_hostile_ones_are_refused():
    runs = [(0, 1), (17, 3), (2**64 - 1, 2**63)]
    text = encode_pages(array.array("Q", [n for run in runs for n in run]).tobytes())
    assert parse_request(encode({"cmd": "check", "deep": False, "pages": text})) == Request(
        "check", {"deep": False, "pages": text})
    raw = decode_pages(text)
    assert [tuple(memoryview(raw).cast("Q")[i : i + 2]) for i in (0, 2, 4)] == runs
    assert decode_pages(encode_pages(b"")) == b""
    for bad, message in (("not base64!", "must be base64"), (base64.b64encode(bytes(15)).decode(), "whole")):
        with pytest.raises(GuestError, match=message):
            decode_pages(bad)


def test_a_long_line_in_pieces_is_bounded_before_its_end_arrives():
    lines = LineBuffer(max_line=100)
    for _ in range(10):
        assert lines.feed(b"y" * 10) == []
    with pytest.raises(GuestError, match="longer than 100 bytes"):
        lines.feed(b"y")
