"""A source and a destination Connection joined in memory (after h11's ConnectionPair)."""

from __future__ import annotations

import msgpack

from migrator.core.model import Region
from migrator.protocol import NEED_DATA, ZERO_PAGES, Auth, Connection, ConnectionClosed, Hello, Layout, Role
from migrator.protocol._frames import CHECKSUM, F_MAC, FRAME_VERSION, HEADER, MAGIC, TYPE_CODES

S, D = Role.SOURCE, Role.DEST
TOKEN = b"0123456789abcdef-test-token"
PS = 4096
LAYOUT = Layout(
    regions=(Region(0x7F0000000000, 64 * PS), Region(0x7F0000100000, 16 * PS)),
    meta={"id": "test", "tracker": "fake"},
)


def drain(conn: Connection) -> list:
    events = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if type(event) is ConnectionClosed:
            return events


class ConnectionPair:
    def __init__(self, *, token: bytes | None = None, compress: str = "zstd:1", **dest_kwargs) -> None:
        self.conn = {
            S: Connection(S, token=token, compress=compress),
            D: Connection(D, token=token, **dest_kwargs),
        }
        self.wire: dict[Role, list[bytes]] = {S: [], D: []}

    def other(self, role: Role) -> Role:
        return D if role is S else S

    def send(self, role: Role, events, expect=...):
        """Send ``events`` from ``role``; the other side must decode ``expect`` (default: the same)."""
        if not isinstance(events, list):
            events = [events]
        data = b""
        for event in events:
            frame = self.conn[role].send(event)
            self.wire[role].append(frame)
            data += frame
        receiver = self.conn[self.other(role)]
        if data:
            receiver.receive_data(data)
        got = drain(receiver)
        if expect is not ...:
            assert got == expect
        return got

    def handshake(self, *, streams: int = 1, dest_features: tuple[str, ...] = ("zstd", ZERO_PAGES)) -> None:
        self.send(S, Hello(streams=streams, features=("zstd", ZERO_PAGES)), expect=...)
        self.send(D, Hello(features=dest_features), expect=...)
        self.send(S, Auth(), expect=...)

    def open(self, layout: Layout = LAYOUT, **kwargs) -> None:
        self.handshake(**kwargs)
        self.send(S, layout)


def craft(kind, fields: dict | bytes, *, seq: int, body: bytes = b"", flags: int = 0,
          version: int = FRAME_VERSION, magic: bytes = MAGIC, integrity=CHECKSUM, reserved: int = 0) -> bytes:
    """A frame with any content and a valid tag: reaches the decoder behind the checksum."""
    meta = fields if isinstance(fields, bytes) else msgpack.packb(fields, use_bin_type=True)
    code = kind if isinstance(kind, int) else TYPE_CODES[kind]
    flags |= integrity.flag
    header = HEADER.pack(magic, version, code, flags, reserved, len(meta), len(body), seq)
    payload_tag = integrity.payload_tag(body) if body else b""
    return header + meta + body + payload_tag + integrity.frame_tag(header, meta, payload_tag)


__all__ = ["D", "F_MAC", "LAYOUT", "PS", "S", "TOKEN", "ConnectionPair", "craft", "drain"]
