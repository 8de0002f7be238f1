"""The guest control protocol as pure functions: JSON lines in, validated requests out.

One JSON object per line each way. A request is ``{"cmd": NAME, ...arguments}``; a reply is
``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``. Descriptors travel as SCM_RIGHTS
on the reply line. Only JSON is ever decoded: no pickle, no eval. See docs/guest-protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from ..core.errors import GuestError

# A check of a migration's final pages, or a post-copy discard, carries their runs (16 bytes
# each, base64) on one line.
MAX_LINE = 4 << 20
MAX_CHECK_RUNS = (MAX_LINE - 4096) // 4 * 3 // 16

# command -> {argument: type}; every argument is optional unless listed in REQUIRED
ARGUMENTS: dict[str, dict[str, type]] = {
    "attach": {"tracker": str},
    "stats": {},
    "digest": {},
    "check": {"deep": bool, "pages": str},
    "discard": {"pages": str},
    "pause": {"at_step": int},
    "resume": {"until_step": int},
    "set-tag": {"tag": str},
    "quit": {},
}
REQUIRED: dict[str, tuple[str, ...]] = {"set-tag": ("tag",), "discard": ("pages",)}


@dataclass(frozen=True, slots=True)
class Request:
    cmd: str
    args: dict = field(default_factory=dict)


def parse_request(line: bytes) -> Request:
    """Decode and validate one request line; GuestError names what is wrong."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise GuestError(f"bad JSON: {exc}") from None
    if not isinstance(message, dict):
        raise GuestError("a request must be a JSON object")
    cmd = message.pop("cmd", None)
    if not isinstance(cmd, str):
        raise GuestError('a request needs a "cmd" string')
    allowed = ARGUMENTS.get(cmd)
    if allowed is None:
        raise GuestError(f"unknown command {cmd!r} (known: {', '.join(ARGUMENTS)})")
    for name, value in message.items():
        kind = allowed.get(name)
        if kind is None:
            raise GuestError(f"{cmd}: unknown argument {name!r}")
        if type(value) is not kind:   # bool is not an int here
            raise GuestError(f"{cmd}: {name} must be {'an integer' if kind is int else 'a string'}")
        if kind is int and value < 0:
            raise GuestError(f"{cmd}: {name} must not be negative")
    for name in REQUIRED.get(cmd, ()):
        if name not in message:
            raise GuestError(f"{cmd}: missing argument {name!r}")
    return Request(cmd, message)


def encode_pages(pairs: bytes) -> str:
    """Runs of region pages, native 64-bit (first, count) pairs, as the ``pages`` argument of
    ``check`` and ``discard``: base64 (the control socket never leaves the host, so native order
    is fine)."""
    return base64.b64encode(pairs).decode("ascii")


def decode_pages(text: str, cmd: str = "check") -> bytes:
    """``cmd``'s ``pages`` argument back to native 64-bit (first, count) pairs; GuestError if it
    is not whole pairs of base64. Where the pages lie is the C caller's to bound."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise GuestError(f"{cmd}: pages must be base64") from None
    if len(raw) % 16:
        raise GuestError(f"{cmd}: pages must be whole (first, count) pairs of 8 bytes, not {len(raw)} bytes")
    return raw


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def ok_reply(**fields) -> bytes:
    return encode({"ok": True, **fields})


def error_reply(message: str) -> bytes:
    return encode({"ok": False, "error": " ".join(message.split())})


def parse_reply(line: bytes) -> dict:
    """A reply line as a dict with a boolean ``ok``; GuestError if it is not one."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise GuestError(f"the guest sent bad JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("ok"), bool):
        raise GuestError('the guest sent a reply without an "ok" boolean')
    return message


class LineBuffer:
    """Bytes in, complete lines out; a line longer than ``max_line`` is an error."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        if b"\n" not in data:      # a long line arrives in many pieces: split it once, at its end
            if len(self._pending) > self.max_line:
                raise GuestError(f"line longer than {self.max_line} bytes")
            return []
        *lines, rest = self._pending.split(b"\n")
        self._pending = bytearray(rest)
        if len(self._pending) > self.max_line or any(len(line) > self.max_line for line in lines):
            raise GuestError(f"line longer than {self.max_line} bytes")
        return [bytes(line) for line in lines]
