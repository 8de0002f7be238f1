"""``Connection``: the only stateful object of the codec. Bytes in, events out; no I/O.

::

    conn = Connection(Role.DEST, token=token)
    while (event := conn.next_event()) is NEED_DATA:
        conn.receive_data(await stream.receive_some())
    await stream.send_all(conn.send(Ack(of=Acked.DIGEST, ok=True)))

Errors: misuse raises ``LocalProtocolError`` from ``send``/``send_deferred`` and the constructors;
bad peer data raises ``RemoteProtocolError`` from ``next_event`` only (and from
``PendingPages.decode``, the deferred tail of ``next_event``). Internally every check raises
``LocalProtocolError``; ``_peer_errors`` converts at the boundary. After any error the connection
is in state ERROR and refuses further work.

Large frames need not be copied: when ``next_event`` says NEED_DATA and ``incomplete_frame()``
names the size of the frame it waits for, a transport may hand over one buffer of exactly that
size with ``gather_frame`` (it returns the part still to fill, for ``recv_into``), report what it
wrote with ``gathered``, and get the frame's raw payload back as a read-only view of that buffer.
A transport that maps the memory the pages belong to can do better for a raw Pages frame:
``incoming_pages()`` names its runs once its meta is buffered (checked as the frame will be),
``place_frame(views, owner)`` takes the views the payload is to land in, and the frame comes back
as ``PlacedPages`` once its tags are checked. Until then nothing vouches for those bytes: a
transport may place only into memory that a failed session throws away.

Heavy work can leave the event loop's thread: ``send_deferred`` settles state and sequence number
at once and returns a ``PendingFrame`` whose ``finish(compressor)`` (compression, MAC) may run in
any thread; with ``defer_payloads=True``, ``next_event`` returns ``PendingPages`` whose
``decode(decompressor)`` (MAC check, decompression) may too. The Connection itself must only be
used from one thread.

Parallel streams: the source opens extra connections with ``join=primary, stream=k``; the
destination's connections get ``sessions=lookup`` (session id -> primary Connection) to resolve
them. Joined streams carry Pages and Zero only, bounds-checked against the primary's Layout.
"""

from __future__ import annotations

import enum
import hmac
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import zstandard

from ..core.errors import LocalProtocolError, RemoteProtocolError
from ..core.model import Run
from . import _handshake as hs
from ._bounds import LayoutBounds
from ._buffer import ReceiveBuffer
from ._frames import (
    CHECKSUM, CHECKSUM_FRAMES, DEFAULT_MAX_FRAME, PROTECTED, Checksum, F_MAC, F_ZEROS, F_ZSTD, HANDSHAKE_MAX_FRAME, HEADER, TYPE_CODES, Header, Integrity,
    Mac, assemble, assemble_parts, frame_size, parse_header,
)
from ._placed import PlacedFrame, Target, is_target
from ._payload import ZERO_PAGES, Compression, as_bytes_view, decode_payload, encode_payload, worth_compressing
from ._state import DATA_STATES, LIVE, RECORDED, Role, State, symbol, transition
from ._wire import decode_fields, encode_meta, hello_version
from .events import (
    DATA_EVENTS, NONCE_SIZE, PROTOCOL_VERSION, SESSION_ID_SIZE, Abort, Auth, Commit, ConnectionClosed, Digest,
    Discard, Event, Fence, Hello, Index, Lacking, Layout, Pages, Request, _int, _runs,
)

MIN_TOKEN = 16
RAW = Compression(None)

_HANDSHAKE_STATES = frozenset({
    State.START, State.SOURCE_HELLO, State.DEST_HELLO, State.JOIN_SOURCE_HELLO, State.JOIN_DEST_HELLO,
})


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Sentinel.NEED_DATA


@contextmanager
def _peer_errors(on_error: Callable[[], None] | None = None) -> Iterator[None]:
    """The one place where checks of peer data become RemoteProtocolError."""
    try:
        yield
    except LocalProtocolError as exc:
        if on_error is not None:
            on_error()
        raise RemoteProtocolError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class PendingFrame:
    """A frame whose sequence number and state change are settled; what remains (compression,
    payload MAC, assembly) is pure. Call ``finish`` exactly once, in any thread, and write the
    frames of one Connection in the order ``send_deferred`` returned them."""

    kind: type[Event]
    seq: int
    meta: bytes
    raw: memoryview | None
    compression: Compression
    integrity: Integrity
    page_size: int = 0           # Pages: zero pages are left out of a payload worth compressing
    sampled: bool = False        # ``sample`` found the payload worth compressing

    @property
    def raw_len(self) -> int:
        return 0 if self.raw is None else len(self.raw)

    @property
    def needs_thread(self) -> bool:
        """Worth a worker thread: compressing or MACing a payload."""
        return self.raw is not None and (self.compression.level is not None or isinstance(self.integrity, Mac))

    def sample(self, compressor: zstandard.ZstdCompressor) -> PendingFrame:
        """This frame after sampling its payload (a few 4 KiB compressions, cheap enough for any
        thread): marked to go raw when zstd would not shrink it (random or encrypted pages),
        which can spare it a worker thread, else marked ``sampled`` so that ``finish`` does not
        sample again. ``compressor`` belongs to the calling thread."""
        if self.raw is None or self.compression.level is None or self.sampled:
            return self
        if worth_compressing(compressor, self.raw):
            return replace(self, sampled=True)
        return replace(self, compression=RAW)

    def finish(self, compressor: zstandard.ZstdCompressor | None = None) -> bytes:
        """The frame's bytes. ``compressor`` belongs to the calling thread (made here if None)."""
        return b"".join(self.finish_parts(compressor))

    def finish_parts(self, compressor: zstandard.ZstdCompressor | None = None) -> tuple:
        """The frame as three buffers to write in order (the payload is not copied)."""
        flags, body = 0, b""
        if self.raw is not None:
            if self.compression.level is not None and compressor is None:
                compressor = self.compression.compressor()
            flags, body = encode_payload(compressor if self.compression.level is not None else None, self.raw,
                                         sample=not self.sampled, page_size=self.page_size)
        return assemble_parts(TYPE_CODES[self.kind], flags, self.seq, self.meta, body, self.integrity)


@dataclass(frozen=True, slots=True)
class PendingPages:
    """A received Pages frame whose payload is not checked or decompressed yet."""

    round: int
    runs: tuple[Run, ...]
    raw_len: int
    flags: int
    body: bytes | memoryview
    payload_tag: bytes
    integrity: Integrity
    where: str                      # "frame seq N at byte X", for messages
    page_size: int
    owner: object = None            # a placed frame's (``body`` is then its views)

    @property
    def wire_len(self) -> int:
        if type(self.body) is tuple:
            return sum(view.nbytes for view in self.body)
        return len(self.body)

    @property
    def needs_thread(self) -> bool:
        return bool(self.flags & (F_ZSTD | F_ZEROS)) or isinstance(self.integrity, Mac)

    def decode(self, decompressor: zstandard.ZstdDecompressor) -> Pages | PlacedPages:
        """Check the payload's tag and decompress it (any thread; ``decompressor`` is the
        thread's own). Raises RemoteProtocolError; the caller must then drop the connection."""
        with _peer_errors():
            return self._decode(decompressor)

    def _decode(self, decompressor: zstandard.ZstdDecompressor) -> Pages | PlacedPages:
        expected = self.integrity.payload_tag(self.body)
        if not hmac.compare_digest(expected, self.payload_tag):
            raise LocalProtocolError(f"payload of {self.where} fails its {self.integrity.name} (corrupted or forged)")
        if type(self.body) is tuple:
            return PlacedPages(round=self.round, runs=self.runs, owner=self.owner)
        raw = decode_payload(decompressor, self.flags, self.body, self.raw_len, self.page_size)
        return Pages(round=self.round, runs=self.runs, payload=raw)


@dataclass(frozen=True, slots=True)
class IncomingPages:
    """A raw Pages frame whose payload is still to come (see ``Connection.incoming_pages``)."""

    round: int
    runs: tuple[Run, ...]
    payload_len: int


@dataclass(frozen=True, slots=True)
class PlacedPages:
    """A Pages frame received into the views given to ``place_frame``, its tags checked; not an
    event on the wire. ``owner`` is what the transport passed with the views."""

    round: int
    runs: tuple[Run, ...]
    owner: object


@dataclass(frozen=True, slots=True)
class ConnectionStats:
    state: State
    frames_sent: int
    frames_received: int
    bytes_received: int


class Connection:
    """One side of one byte stream of a migration session (see the module docstring)."""

    def __init__(
        self,
        role: Role,
        *,
        token: bytes | None = None,
        compress: str = "zstd:1",
        max_frame: int = DEFAULT_MAX_FRAME,
        recorded: bool = False,
        defer_payloads: bool = False,
        join: Connection | None = None,
        stream: int = 0,
        sessions: Callable[[bytes], Connection | None] | None = None,
    ) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be Role.SOURCE or Role.DEST, not {role!r}")
        if token is not None and (type(token) is not bytes or len(token) < MIN_TOKEN):
            raise LocalProtocolError(f"token must be bytes, at least {MIN_TOKEN} of them")
        if type(max_frame) is not int or max_frame < HANDSHAKE_MAX_FRAME:
            raise LocalProtocolError(f"max_frame must be an int >= {HANDSHAKE_MAX_FRAME}")
        self.role = role
        self.recorded = recorded
        self.max_frame = max_frame
        self.compression = Compression.parse(compress)
        self._defer = defer_payloads
        self._table = RECORDED if recorded else LIVE
        self._state = State.START
        self._token = token
        self._sessions = sessions
        self._send_seq = 0
        self._recv_seq = 0
        self._buffer = ReceiveBuffer()
        self._consumed = 0                 # stream offset of the buffer's first byte
        self._incomplete = 0               # size of the frame NEED_DATA waits for (its header is in)
        self._eof = False
        self._placed: PlacedFrame | None = None   # a frame being received into the transport's views
        self._out: Integrity = CHECKSUM
        self._in: Integrity = CHECKSUM
        self._source_hello: Hello | None = None
        self._dest_hello: Hello | None = None
        self._keys: hs.SessionKeys | None = None
        self._session_id: bytes | None = None
        self._streams = 1
        self._primary: Connection | None = None
        self._stream = 0
        self._joined: set[int] = set()
        self._bounds: LayoutBounds | None = None
        self._layout: Layout | None = None
        self._fence: tuple[int, ...] | None = None
        self._data_limit: tuple[int, ...] | None = None   # joined streams' frames, once data ended
        self._data_frames = 0
        self._compressor: zstandard.ZstdCompressor | None = None
        self._decompressor: zstandard.ZstdDecompressor | None = None
        self._frames_sent = 0
        self._frames_received = 0
        self._refusal = b""
        if join is not None:
            self._join_as_source(join, stream)

    def _join_as_source(self, primary: Connection, stream: int) -> None:
        if self.role is not Role.SOURCE or primary.role is not Role.SOURCE or self.recorded or primary.recorded:
            raise LocalProtocolError("join: only a live source connection joins a live source session")
        if primary._session_id is None or primary._state in _HANDSHAKE_STATES:
            raise LocalProtocolError("join: the primary connection has not finished its handshake")
        if type(stream) is not int or not 1 <= stream < primary._streams:
            raise LocalProtocolError(f"join: stream {stream!r} outside 1..{primary._streams - 1} (Hello.streams)")
        if (self._token is None) != (primary._keys is None):
            raise LocalProtocolError("join: give the parallel stream the same token as the primary")
        self._primary = primary
        self._stream = stream

    # --- read-only views ---------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def peer_hello(self) -> Hello | None:
        return self._dest_hello if self.role is Role.SOURCE else self._source_hello

    @property
    def session_id(self) -> bytes | None:
        return self._session_id

    @property
    def streams(self) -> int:
        """Connections in this session (the source's Hello.streams)."""
        return self._streams

    @property
    def stream(self) -> int:
        return self._stream

    @property
    def authenticated(self) -> bool:
        """The token was proven (or is being, the peer's proof next): session keys exist."""
        return self._keys is not None

    @property
    def frame_macs(self) -> bool:
        """Whether frames carry MACs under the session keys (not only checksums)."""
        return isinstance(self._in, Mac) or isinstance(self._out, Mac)

    @property
    def untagged(self) -> bool:
        """Whether this session's frames go without tags both ways (``PROTECTED``: an
        authenticated link both ends said needs no MAC)."""
        return self._out is PROTECTED and self._in is PROTECTED

    @property
    def buffered(self) -> int:
        """Bytes received and not parsed yet (a stream handed on to another reader after an
        event must have none: they would be lost)."""
        return len(self._buffer)

    @property
    def payloads_may_change(self) -> bool:
        """Whether a Pages payload sent from here may be memory that changes while it is sent:
        on a protected link, whose payloads carry no tag (a tag hashed apart from the send could
        disagree with the bytes that went, and the peer would refuse the frame), and only
        uncompressed. A compressor that matched a page against bytes that changed before it
        read them as literals would encode that page as something it never held: a page
        nobody wrote would arrive wrong (seen: 1 in 25 loopback migrations of a busy guest)."""
        return self._out is PROTECTED and self.compression.level is None

    @property
    def layout(self) -> Layout | None:
        return self._primary._layout if self._primary is not None else self._layout

    @property
    def handshake_done(self) -> bool:
        return self._state not in _HANDSHAKE_STATES and self._state is not State.ERROR

    @property
    def data_frames(self) -> int:
        """Pages and Zero frames sent or received on this connection."""
        return self._data_frames

    def statistics(self) -> ConnectionStats:
        return ConnectionStats(self._state, self._frames_sent, self._frames_received, self._consumed)

    # --- sending -----------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes of ``event``'s frame (compressing in this thread)."""
        pending = self.send_deferred(event)
        compressor = None
        if pending.raw is not None and self.compression.level is not None:
            if self._compressor is None:
                self._compressor = self.compression.compressor()
            compressor = self._compressor
        return pending.finish(compressor)

    def send_deferred(self, event: Event) -> PendingFrame:
        """Settle ``event``'s state change and sequence number now; build its bytes later."""
        if self._state is State.ERROR:
            raise LocalProtocolError("cannot send: the connection failed earlier (state ERROR)")
        try:
            return self._prepare(event)
        except LocalProtocolError:
            self._state = State.ERROR
            raise

    def send_failed(self) -> None:
        """The transport could not write a frame: nothing more may be sent or trusted."""
        self._state = State.ERROR

    def _prepare(self, event: Event) -> PendingFrame:
        if not isinstance(event, Event) or type(event) is ConnectionClosed:
            raise LocalProtocolError(f"cannot send {type(event).__name__}: not a protocol event")
        me = self.role
        if type(event) is Hello:
            sym = "JoinHello" if me is Role.SOURCE and self._primary is not None else "Hello"
        else:
            sym = symbol(event, me)
        target, _ = transition(self._table, self._state, me, sym, received=False)
        if self._state is State.DATA:
            self._check_primary_takes_data(sym)
        integrity = self._out
        if type(event) is Hello:
            event = self._fill_hello(event)
        elif type(event) is Auth:
            event = self._fill_auth(event)
        raw, page_size = None, 0
        if type(event) in DATA_EVENTS:
            bounds = self._require_bounds()
            pages = bounds.check(event.runs)
            if type(event) is Pages:
                raw, page_size = as_bytes_view(event.payload), bounds.page_size if self._peer_reads_zeros() else 0
                if len(raw) != pages * bounds.page_size:
                    raise LocalProtocolError(f"Pages.payload: {len(raw)} bytes for {pages} pages of {bounds.page_size}")
        meta = encode_meta(event)
        size = frame_size(len(meta), len(raw) if raw is not None else 0, 16)
        if size > self.max_frame:
            raise LocalProtocolError(f"{type(event).__name__} frame of {size} bytes exceeds max_frame {self.max_frame}: send smaller batches")
        self._after(event, me)
        pending = PendingFrame(type(event), self._send_seq, meta, raw, self.compression, integrity, page_size)
        self._send_seq += 1
        self._frames_sent += 1
        self._state = target
        return pending

    def _peer_reads_zeros(self) -> bool:
        """Whether Pages may leave zero pages out (flag ZEROS): the peer said it reads them, or
        the stream is recorded (an image is read by this version or a newer one)."""
        hello = self.peer_hello
        return self.recorded or (hello is not None and ZERO_PAGES in hello.features)

    def _fill_hello(self, hello: Hello) -> Hello:
        if hello.handshake_fields_set:
            raise LocalProtocolError("Hello: auth, recorded, nonce, session, stream and proof are set by the Connection")
        nonce = os.urandom(NONCE_SIZE)
        if self.role is Role.SOURCE:
            if self._primary is not None:
                primary = self._primary
                hello = replace(hello, streams=primary._streams, auth=primary._keys is not None, nonce=nonce,
                                session=primary._session_id, stream=self._stream)
            else:
                hello = replace(hello, auth=self._token is not None, recorded=self.recorded, nonce=nonce)
            if self.recorded and self._token is not None:
                th = hs.transcript(hello)
                hello = replace(hello, proof=hs.recorded_proof(self._token, th))
                self._keys = hs.session_keys(self._token, th)
                self._out = self._keys.source_to_dest
            self._source_hello = hello
            self._streams = hello.streams
            return hello
        source = self._source_hello
        if self._primary is not None:
            hello = replace(hello, auth=source.auth, nonce=nonce, session=source.session, stream=source.stream)
        else:
            hello = replace(hello, auth=source.auth, nonce=nonce, session=os.urandom(SESSION_ID_SIZE))
            self._session_id = hello.session
        secret = self._secret()
        if secret is not None:
            th = hs.transcript(source, hello)
            hello = replace(hello, proof=hs.dest_proof(secret, th))
            self._keys = hs.session_keys(secret, th)
            self._out = self._session_tags(self._keys.dest_to_source, source, hello)
        self._dest_hello = hello
        return hello

    def _session_tags(self, mac: Integrity, source: Hello, dest: Hello) -> Integrity:
        """An authenticated session's frame tags in one direction: ``mac``, unless both ends said
        their link is one nobody but root can write into, or TLS (``CHECKSUM_FRAMES``): then
        checksums of the frames' headers and meta only (``PROTECTED``: the link cannot corrupt a
        payload, and the page digests compare every page). The Hellos are in the handshake's
        transcript, so the feature cannot be added on the way. Images always carry MACs."""
        if self.recorded or not (CHECKSUM_FRAMES in source.features and CHECKSUM_FRAMES in dest.features):
            return mac
        return PROTECTED

    def _fill_auth(self, auth: Auth) -> Auth:
        if auth.proof:
            raise LocalProtocolError("Auth: the proof is set by the Connection")
        if self._keys is None:
            return auth
        self._out = self._session_tags(self._keys.source_to_dest, self._source_hello, self._dest_hello)
        return Auth(proof=hs.source_proof(self._secret(), hs.transcript(self._source_hello, self._dest_hello)))

    def _secret(self) -> bytes | None:
        """What this connection's handshake is keyed with: the token, or for a parallel stream
        the primary connection's session secret."""
        if self._primary is not None:
            keys = self._primary._keys
            return keys.secret if keys is not None else None
        return self._token

    # --- receiving ---------------------------------------------------------------------------

    def receive_data(self, data) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer's stream ended."""
        if self._eof:
            raise LocalProtocolError("receive_data after end of stream")
        if data:
            if self._placed is not None and not self._placed.complete:
                raise LocalProtocolError("receive_data while a placed frame is incomplete: report its bytes with gathered()")
            if self._buffer.unfilled:
                raise LocalProtocolError("receive_data while a gathered frame is incomplete: report its bytes with gathered()")
            self._buffer.append(data)
        else:
            self._eof = True

    def incomplete_frame(self) -> int:
        """The size of the frame ``next_event`` is waiting for when its header is already
        buffered (so its size is known and checked against ``max_frame``); 0 when no header is
        buffered yet, the frame is complete, or it is being gathered already."""
        if self._eof or self._buffer.unfilled or self._placed is not None or self._state is State.ERROR:
            return 0
        return self._incomplete if len(self._buffer) < self._incomplete else 0

    def gather_frame(self, buffer) -> memoryview:
        """Receive the rest of the incomplete frame straight into ``buffer``: writable, exactly
        ``incomplete_frame()`` bytes, kept by the Connection (a raw payload is handed out as a
        read-only view of it, never copied). What is buffered of the frame is copied to its
        front; returns the view still to fill, in order, each part reported with ``gathered``.
        Do not write to ``buffer`` afterwards."""
        size = self.incomplete_frame()
        if not size:
            raise LocalProtocolError("gather_frame: no incomplete frame with a known size (see incomplete_frame)")
        view = memoryview(buffer)
        if view.readonly or not view.c_contiguous:
            raise LocalProtocolError("gather_frame: the buffer must be writable and contiguous")
        if view.nbytes != size:
            raise LocalProtocolError(f"gather_frame: a buffer of {view.nbytes} bytes for a frame of {size}")
        return self._buffer.adopt(as_bytes_view(view))

    def frame_head_missing(self) -> int:
        """Bytes of the incomplete frame's header and meta still to come (0 when no frame with
        a known size waits, or they are buffered): a transport reads these before
        ``incoming_pages`` can tell what the frame carries."""
        if not self.incomplete_frame():
            return 0
        header = parse_header(self._buffer.peek(HEADER.size))
        return max(0, HEADER.size + header.meta_len - len(self._buffer))

    def incoming_pages(self) -> IncomingPages | None:
        """The runs of the incomplete frame when it is a raw Pages frame this connection would
        accept now (state, bounds and payload length checked as ``next_event`` will) and its
        meta is buffered; None for any other frame. Raises RemoteProtocolError for bad meta."""
        if not self.incomplete_frame():
            return None
        buffered = len(self._buffer)
        header = parse_header(self._buffer.peek(HEADER.size))
        if header.kind is not Pages or header.flags & (F_ZSTD | F_ZEROS) or buffered < HEADER.size + header.meta_len:
            return None
        with _peer_errors(self.send_failed):
            where = f"frame seq {header.seq} at byte {self._consumed}"
            meta = self._buffer.peek(HEADER.size + header.meta_len)[HEADER.size:]
            round_, runs = self._pages_fields(meta, where)
            _, drop = transition(self._table, self._state, self.role.peer, "Pages", received=True)
            if drop or (self._state is State.DATA and self._check_joined_data("Pages", where)):
                return None                      # dropped when it is complete
            pages = self._require_bounds().check(runs)
            if header.payload_len != pages * self._require_bounds().page_size:
                raise LocalProtocolError(f"{where}: raw payload of {header.payload_len} bytes, the runs need "
                                         f"{pages * self._require_bounds().page_size}")
        return IncomingPages(round_, runs, header.payload_len)

    def place_frame(self, payload, owner: object = None) -> list[memoryview | tuple[Target, int]]:
        """Receive the payload of the frame ``incoming_pages`` named straight into ``payload``
        (writable byte views, or ``Target``s the transport fills itself where payloads carry no
        tag; exactly the payload's length in all, in the runs' order); the frame comes back as
        ``PlacedPages`` carrying ``owner``. Returns the parts still to fill, in order (the
        payload's, then the frame's tags; a target as (target, its first byte to fill)), each
        part reported with ``gathered``."""
        incoming = self.incoming_pages()
        if incoming is None:
            raise LocalProtocolError("place_frame: the incomplete frame is not a raw Pages frame with its meta buffered")
        views = [part if is_target(part) else memoryview(part) for part in payload]
        if any(type(view) is memoryview and (view.readonly or not view.c_contiguous or view.itemsize != 1) for view in views):
            raise LocalProtocolError("place_frame: the views must be writable, contiguous bytes")
        if len(views) != sum(type(view) is memoryview for view in views) and not self.untagged:
            raise LocalProtocolError("place_frame: a target the transport fills needs a session whose payloads carry no tag")
        if sum(view.nbytes for view in views) != incoming.payload_len:
            raise LocalProtocolError(f"place_frame: views of {sum(view.nbytes for view in views)} bytes "
                                     f"for a payload of {incoming.payload_len}")
        header = parse_header(self._buffer.peek(HEADER.size))
        head_len = HEADER.size + header.meta_len
        buffered = self._buffer.take(len(self._buffer))
        placed = PlacedFrame(bytes(buffered[:head_len]), views, 2 * header.tag_size, owner)
        placed.copy_in(buffered[head_len:])
        self._placed = placed
        self._incomplete = 0
        return placed.unfilled()

    def gathered(self, nbytes: int) -> None:
        """``nbytes`` more bytes of the gathered frame were written to the view ``gather_frame``
        returned (after those reported before), or of a placed frame to those ``place_frame``
        returned."""
        if self._placed is not None:
            missing = self._placed.missing
            if type(nbytes) is not int or not 0 < nbytes <= missing:
                raise LocalProtocolError(f"gathered: {nbytes!r} bytes, the frame misses {missing}")
            self._placed.filled(nbytes)
            return
        unfilled = self._buffer.unfilled
        if not unfilled:
            raise LocalProtocolError("gathered: no frame is being gathered")
        if type(nbytes) is not int or not 0 < nbytes <= unfilled:
            raise LocalProtocolError(f"gathered: {nbytes!r} bytes, the frame misses {unfilled}")
        self._buffer.filled(nbytes)

    def skip_to(self, seq: int, offset: int) -> None:
        """Recorded streams only, right after the Hello: drop what is buffered; the next bytes
        fed are frame ``seq`` at stream offset ``offset`` (a reader jumps to the image's Index
        without decoding what lies before it)."""
        if not self.recorded or self.role is not Role.DEST or self._state is not State.READY or self._eof:
            raise LocalProtocolError("skip_to: only on a recorded destination right after its Hello")
        self._buffer.clear()
        self._incomplete = 0
        self._recv_seq = seq
        self._consumed = offset

    def next_event(self) -> Event | PendingPages | _Sentinel:
        """The next event, ``NEED_DATA``, or ``ConnectionClosed`` once the stream ended cleanly.

        With ``defer_payloads`` Pages come as ``PendingPages``. Raises RemoteProtocolError on
        any bad input (and the connection is then in state ERROR).
        """
        if self._state is State.ERROR:
            raise RemoteProtocolError("the connection failed earlier (state ERROR)")
        with _peer_errors(self.send_failed):
            event = self._next_event()
            while event is None:
                event = self._next_event()
            return event

    def _next_event(self) -> Event | PendingPages | _Sentinel | None:
        """One step: an event, NEED_DATA, or None for a frame that was checked and dropped."""
        buf = self._buffer
        where = f"byte {self._consumed}"
        if self._placed is not None:
            return self._next_placed(where)
        if len(buf) < HEADER.size:
            if not self._eof:
                return NEED_DATA
            if buf:
                raise LocalProtocolError(f"truncated frame at {where}: the stream ended inside its header ({len(buf)} bytes)")
            return self._closed()
        header = parse_header(buf.peek(HEADER.size))
        limit = HANDSHAKE_MAX_FRAME if self._state in _HANDSHAKE_STATES else self.max_frame
        total = header.total
        if total > limit:
            raise LocalProtocolError(f"oversized frame at {where}: {total} bytes, max_frame is {limit}")
        if len(buf) < total:
            if self._eof:
                raise LocalProtocolError(f"truncated frame at {where}: the stream ended after {len(buf)} of {total} bytes")
            self._incomplete = total
            return NEED_DATA
        self._incomplete = 0
        tag = header.tag_size
        end_meta = HEADER.size + header.meta_len
        end_body = end_meta + header.payload_len
        frame = buf.take(total)
        head = bytes(frame[: HEADER.size])
        meta = bytes(frame[HEADER.size : end_meta])
        body = frame[end_meta:end_body]          # a view: the payload is not copied here
        if not body.readonly:                    # a gathered frame: the consumer may only read
            body = body.toreadonly()
        payload_tag = bytes(frame[end_body : end_body + tag]) if header.payload_len else b""
        frame_tag = bytes(frame[total - tag : total])
        self._consumed += total
        self._verify(header, head, meta, payload_tag, frame_tag, where)
        where = f"frame seq {header.seq} at {where}"
        return self._process(header, meta, body, payload_tag, where)

    def _next_placed(self, where: str):
        placed = self._placed
        if not placed.complete:
            if self._eof:
                raise LocalProtocolError(f"truncated frame at {where}: the stream ended {placed.missing} bytes before its end")
            return NEED_DATA
        self._placed = None
        header = parse_header(placed.head)
        tag = header.tag_size
        self._consumed += header.total
        head, meta = placed.head[: HEADER.size], placed.head[HEADER.size :]
        payload_tag, frame_tag = bytes(placed.tail[:tag]), bytes(placed.tail[tag:])
        self._verify(header, head, meta, payload_tag, frame_tag, where)
        where = f"frame seq {header.seq} at {where}"
        return self._process(header, meta, placed.payload, payload_tag, where, owner=placed.owner)

    def _pages_fields(self, meta: bytes, where: str) -> tuple[int, tuple[Run, ...]]:
        fields = decode_fields(Pages, meta)
        try:
            return _int("Pages", "round", fields["round"], 0, (1 << 32) - 1), _runs("Pages", fields["runs"])
        except LocalProtocolError as exc:
            raise LocalProtocolError(f"invalid Pages in {where}: {exc}") from None

    def _closed(self) -> ConnectionClosed:
        if self._state is State.CLOSED:
            return ConnectionClosed()
        expected = (self.role.peer, "Closed") in self._table[self._state]
        self._state = State.CLOSED
        return ConnectionClosed(expected=expected)

    def _verify(self, header: Header, head: bytes, meta: bytes, payload_tag: bytes, frame_tag: bytes, where: str) -> None:
        integrity = self._in
        if header.flags & F_MAC != integrity.flag:
            if isinstance(integrity, Checksum):
                raise LocalProtocolError(f"frame at {where} carries a MAC, but no MAC session is established")
            raise LocalProtocolError(f"frame at {where} has no MAC in an authenticated session (injected or downgraded)")
        if not hmac.compare_digest(integrity.frame_tag(head, meta, payload_tag), frame_tag):
            if isinstance(integrity, Checksum):
                raise LocalProtocolError(f"frame at {where} fails its checksum (corrupted)")
            raise LocalProtocolError(f"frame at {where} fails its MAC (forged, corrupted, or from another session)")
        expected = self._recv_seq
        if header.seq < expected:
            raise LocalProtocolError(f"replayed frame at {where}: seq {header.seq} was already received (expected {expected})")
        if header.seq > expected:
            raise LocalProtocolError(f"out-of-order frame at {where}: seq {header.seq}, expected {expected} (frames missing or reordered)")
        self._recv_seq += 1

    def _process(self, header: Header, meta: bytes, body, payload_tag: bytes, where: str, owner: object = None):
        kind = header.kind
        name = kind.__name__
        if kind is Hello and self._state in _HANDSHAKE_STATES:   # before the fields: another version's differ
            self._check_version(hello_version(meta))
        if kind is Pages:
            event = None
            round_, runs = self._pages_fields(meta, where)
        else:
            fields = decode_fields(kind, meta)
            try:
                event = kind(**fields)
            except LocalProtocolError as exc:
                raise LocalProtocolError(f"invalid {name} in {where}: {exc}") from None
        peer = self.role.peer
        sym = symbol(event, peer) if event is not None else "Pages"
        target, drop = transition(self._table, self._state, peer, sym, received=True)
        self._frames_received += 1
        if drop:
            self._state = target
            return None
        if self._state is State.DATA:
            if self._check_joined_data(sym, where):
                return None
        if kind in DATA_EVENTS:
            bounds = self._require_bounds()
            pages = bounds.check(runs if event is None else event.runs)
            if event is None:
                raw_len = pages * bounds.page_size
                if not header.flags & (F_ZSTD | F_ZEROS) and header.payload_len != raw_len:
                    raise LocalProtocolError(f"{where}: raw payload of {header.payload_len} bytes, the runs need {raw_len}")
                if raw_len > self.max_frame:
                    raise LocalProtocolError(f"{where}: {pages} pages exceed max_frame {self.max_frame}")
                event = PendingPages(round_, runs, raw_len, header.flags, body, payload_tag, self._in, where,
                                     bounds.page_size, owner)
        self._after(event, peer, where)
        self._state = target
        if type(event) is PendingPages and not self._defer:
            if self._decompressor is None:
                self._decompressor = zstandard.ZstdDecompressor()
            return event._decode(self._decompressor)
        return event

    # --- effects of events, both directions --------------------------------------------------

    def _after(self, event, sender: Role, where: str = "") -> None:
        kind = type(event)
        received = sender is not self.role
        if kind in DATA_EVENTS or kind is PendingPages:
            self._data_frames += 1
        elif kind is Hello and received:
            self._receive_hello(event, where)
        elif kind is Auth and received and self._keys is not None:
            th = hs.transcript(self._source_hello, self._dest_hello)
            if not hs.proof_matches(hs.source_proof(self._secret(), th), event.proof):
                raise LocalProtocolError("authentication failed: the source does not know the token")
            self._in = self._session_tags(self._keys.source_to_dest, self._source_hello, self._dest_hello)
        elif kind is Layout:
            hello = self._source_hello
            if hello is not None and hello.page_size != event.page_size:
                raise LocalProtocolError(f"Layout.page_size {event.page_size} differs from the source's Hello.page_size {hello.page_size}")
            self._layout = event
            self._bounds = LayoutBounds(event)
        elif kind is Fence:
            if len(event.frames) != self._streams:
                raise LocalProtocolError(f"Fence names {len(event.frames)} streams, the session has {self._streams}")
            if self._fence is not None and any(now < before for now, before in zip(event.frames, self._fence)):
                raise LocalProtocolError(f"Fence {event.frames} goes back from {self._fence}")
            self._fence = event.frames
        elif kind is Index:
            frames = self._recv_seq - 1 if received else self._send_seq
            if len(event.entries) != frames:
                raise LocalProtocolError(f"Index lists {len(event.entries)} frames, the stream had {frames}")
        if kind in (Discard, Request, Lacking):
            self._require_bounds().check(event.runs)    # stale or requested pages lie in the Layout
        # Data ends at an Abort, at a pre-copy Commit, or (post-copy: pages follow the Commit) at the
        # source's page digest after it. Frames of parallel streams sent before are counted by the
        # last Fence.
        ends_data = kind is Abort or (kind is Commit and self._state is not State.SWITCHED) or (
            kind is Digest and self._state is State.POSTCOPY)
        if ends_data and sender is Role.SOURCE and self._data_limit is None:
            self._data_limit = self._fence or (0,) * self._streams

    def _check_version(self, version: int | None) -> None:
        """Refuse a Hello of another protocol version (None: unreadable, left to the decoder).

        A live destination keeps a Hello of its own for the transport to send before it closes
        (``version_refusal``): the peer checks the version of a Hello first, so even an older
        migrator then reports the mismatch, where it would otherwise see a dropped connection.
        """
        if version is None or version == PROTOCOL_VERSION:
            return
        if self.recorded:
            raise LocalProtocolError(f"the image was recorded with protocol version {version}; "
                                     f"this migrator reads version {PROTOCOL_VERSION} only")
        if self.role is Role.DEST and self._send_seq == 0:
            hello = Hello(nonce=os.urandom(NONCE_SIZE), session=os.urandom(SESSION_ID_SIZE))
            self._refusal = assemble(TYPE_CODES[Hello], 0, 0, encode_meta(hello), b"", CHECKSUM)
        raise LocalProtocolError(f"peer speaks protocol version {version}; this side speaks {PROTOCOL_VERSION} "
                                 "(run the same migrator version on both sides)")

    def version_refusal(self) -> bytes:
        """After ``next_event`` refused the peer's Hello for its protocol version: a Hello frame
        of this side's version, to send before closing so that the peer can say what is wrong.
        ``b""`` if there is none (not a live destination, or no such refusal)."""
        return self._refusal

    def _receive_hello(self, hello: Hello, where: str) -> None:
        if hello.recorded != (self.recorded and self.role is Role.DEST):
            raise LocalProtocolError("a recorded image where a live peer was expected" if hello.recorded
                                     else "a live stream where a recorded image was expected")
        if len(hello.nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"Hello.nonce: {len(hello.nonce)} bytes, expected {NONCE_SIZE}")
        if self.role is Role.DEST:
            self._receive_source_hello(hello)
        else:
            self._receive_dest_hello(hello)

    def _receive_source_hello(self, hello: Hello) -> None:
        if hello.session:
            primary = self._sessions(hello.session) if self._sessions is not None else None
            if primary is None or primary._session_id is None or primary._state is State.ERROR:
                raise LocalProtocolError("a parallel stream asks to join an unknown or finished session")
            if not 1 <= hello.stream < primary._streams:
                raise LocalProtocolError(f"parallel stream {hello.stream} outside 1..{primary._streams - 1}")
            if hello.stream in primary._joined:
                raise LocalProtocolError(f"parallel stream {hello.stream} joined twice")
            if hello.auth != (primary._keys is not None):
                raise LocalProtocolError("a parallel stream's authentication differs from its session's")
            primary._joined.add(hello.stream)
            self._primary = primary
            self._stream = hello.stream
            self._streams = primary._streams
            self._session_id = hello.session
        else:
            if hello.auth and self._token is None:
                raise LocalProtocolError("the source authenticates with a token, but this side has none")
            if not hello.auth and self._token is not None:
                raise LocalProtocolError("the source offers no authentication, but a token is required here")
            self._streams = hello.streams
            if self.recorded and hello.auth:
                th = hs.transcript(hello)
                if not hs.proof_matches(hs.recorded_proof(self._token, th), hello.proof):
                    raise LocalProtocolError("the image was recorded with a different token")
                self._keys = hs.session_keys(self._token, th)
                self._in = self._keys.source_to_dest
        self._source_hello = hello

    def _receive_dest_hello(self, hello: Hello) -> None:
        ours = self._source_hello
        if hello.auth != ours.auth:
            raise LocalProtocolError("the destination has no token, but this side authenticates with one" if ours.auth
                                     else "the destination requires a token, but this side has none")
        if len(hello.session) != SESSION_ID_SIZE:
            raise LocalProtocolError(f"Hello.session: {len(hello.session)} bytes, expected {SESSION_ID_SIZE}")
        if self._primary is not None and (hello.session != ours.session or hello.stream != ours.stream):
            raise LocalProtocolError("the destination answered a parallel stream for another session or stream")
        self._dest_hello = hello
        secret = self._secret()
        if secret is not None:
            th = hs.transcript(ours, hello)
            if not hs.proof_matches(hs.dest_proof(secret, th), hello.proof):
                raise LocalProtocolError("authentication failed: the destination does not know the token")
            self._keys = hs.session_keys(secret, th)
            self._in = self._session_tags(self._keys.dest_to_source, ours, hello)
        if self._primary is None:
            self._session_id = hello.session

    # --- parallel streams --------------------------------------------------------------------

    def _require_bounds(self) -> LayoutBounds:
        bounds = self._primary._bounds if self._primary is not None else self._bounds
        if bounds is None:
            raise LocalProtocolError("page runs before the session's Layout")
        return bounds

    def _check_primary_takes_data(self, symbol: str) -> None:
        state = self._primary._state
        if state not in DATA_STATES:
            raise LocalProtocolError(f"cannot send {symbol} on stream {self._stream}: the session is in state {state.value}")

    def _check_joined_data(self, symbol: str, where: str) -> bool:
        """Receiving on a joined stream: True to drop the frame (we aborted the session)."""
        primary = self._primary
        if primary._state in (State.ABORTED_BY_DEST, State.ABORTED) and self.role is Role.DEST:
            return True
        if primary._bounds is None:
            raise LocalProtocolError(f"{symbol} on stream {self._stream} before the session's Layout ({where})")
        limit = primary._data_limit
        if limit is not None and self._data_frames + 1 > limit[self._stream]:
            raise LocalProtocolError(f"{symbol} on stream {self._stream} after the session's Commit or Abort ({where})")
        return False
