"""The events of the migration stream: immutable values with validating constructors.

Each event is a keyword-only frozen dataclass. A constructor refuses bad values with
``LocalProtocolError`` (you built a bad event); when the same check fails on decoded wire data the
``Connection`` reports it as ``RemoteProtocolError`` (the peer sent one).

Who sends what (the full rules are the state tables in ``_state``)::

    SOURCE: Hello Auth Layout Pages Zero RoundEnd Freeze Discard Switch Digest Commit Abort  (+ Fence, Index)
    DEST:   Hello Ack Digest Request Abort

Post-copy (``Discard``, ``Switch``, ``Request``): the source names the pages that are stale on the
destination (``Discard``), switches (``Switch``, acknowledged), commits, and the destination's
guest runs while those pages arrive, pushed in the background or fetched on demand (``Request``).

``Fence`` is the transport's ordering marker for parallel streams and ``Index`` ends a recorded
stream (a checkpoint image); engines never see either.

Whatever a side acts on is a typed field: ``RoundEnd.final``, ``Digest.kind`` and ``.last``,
``Ack.of``, ``.ok``, ``.reason``, ``.round`` and ``.ready_ms``; the state tables key on
``Ack.of`` and ``RoundEnd.final`` too. The one open mapping of a session event,
``Ack.timings_ms``, holds measurements the source only reports.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..core.errors import LocalProtocolError
from ..core.model import PAGE_SIZE, Region, Run
from ..core.runs import Runs, count_pages
from ._bounds import U32, check_runs

PROTOCOL_VERSION = 2    # 2: typed control fields (RoundEnd.final, Digest.last, Ack.of …)
POSTCOPY_FEATURE = "postcopy"   # Hello feature: this receiver takes Discard, Switch and sends Request
POSTCOPY_SESSION = "postcopy-session"   # a source's Hello feature: this session may switch to post-copy
URGENT_STREAM = "urgent"        # a joining stream's Hello feature: it carries urgent data only
# An urgent stream's Hello feature, said by both ends when their stream is a plain socket: on a
# link whose frames need no tags (both Hellos say CHECKSUM_FRAMES), a session's urgent stream
# carries no frames after its Switch, but post-copy's fixed request and answer records, read
# and written by native loops at both ends (``migrator/native/postcopy.h``).
NATIVE_FAULTS = "native-faults"

U64 = (1 << 64) - 1
MAX_NAME = 256          # event kinds, feature names, mapping keys
MAX_TEXT = 64 * 1024    # reasons, string values
MAX_ENTRIES = 4096      # entries of a scalar mapping
MAX_DIGEST = 64         # bytes of a digest value
MAX_TIMINGS = 64        # entries of Ack.timings_ms
NONCE_SIZE = 16
SESSION_ID_SIZE = 16

Scalar = int | float | str | bool | None


class Acked(enum.Enum):
    """What an ``Ack`` answers (the value is its wire form)."""

    LAYOUT = "layout"    # the restore guest is ready: round 0 may start
    ROUND = "round"      # every page of a pre-copy round is applied
    DIGEST = "digest"    # the verdict on the last Digest (and the self-check)
    COMMIT = "commit"    # the destination guest runs: the session is done (post-copy: its pages follow)
    SWITCH = "switch"    # post-copy: stale pages dropped, faults armed; the source may commit
    RESUME = "resume"    # an interrupted post-copy goes on: the Lacking list before it is complete


class DigestKind(enum.Enum):
    """What a ``Digest`` covers (the value is its wire form)."""

    PAGES = "pages"      # the per-page digest table of every page sent
    REGION = "region"    # the guest region as a whole, hashed in place (``--verify full``)


class Event:
    """Base class of everything ``Connection.next_event`` can return (but ``NEED_DATA``)."""

    __slots__ = ()


# --- validation helpers: each raises LocalProtocolError naming the field -----------------------


def _fail(event: str, name: str, message: str) -> LocalProtocolError:
    return LocalProtocolError(f"{event}.{name}: {message}")


def _int(event: str, name: str, value: object, low: int = 0, high: int = U64) -> int:
    if type(value) is not int:
        raise _fail(event, name, f"expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(event, name, f"{value} is outside [{low}, {high}]")
    return value


def _bool(event: str, name: str, value: object) -> bool:
    if type(value) is not bool:
        raise _fail(event, name, f"expected a bool, got {type(value).__name__}")
    return value


def _float(event: str, name: str, value: object) -> float:
    """A finite, non-negative number (an int is taken as the float it equals)."""
    if type(value) is int:
        if not 0 <= value <= U64:
            raise _fail(event, name, f"{value} is outside [0, {U64}]")
        value = float(value)
    if type(value) is not float:
        raise _fail(event, name, f"expected a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise _fail(event, name, f"{value} is not a finite number >= 0")
    return value


def _enum(event: str, name: str, value: object, kind: type[enum.Enum]) -> enum.Enum:
    if type(value) is not kind:
        raise _fail(event, name, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _str(event: str, name: str, value: object, limit: int = MAX_NAME, *, empty: bool = False) -> str:
    if type(value) is not str:
        raise _fail(event, name, f"expected a str, got {type(value).__name__}")
    if not value and not empty:
        raise _fail(event, name, "must not be empty")
    if len(value) > limit:
        raise _fail(event, name, f"{len(value)} characters, at most {limit} allowed")
    return value


def _bytes(event: str, name: str, value: object, sizes: Iterable[int] | None = None, limit: int = MAX_DIGEST) -> bytes:
    if type(value) is not bytes:
        raise _fail(event, name, f"expected bytes, got {type(value).__name__}")
    if sizes is not None and len(value) not in sizes:
        raise _fail(event, name, f"{len(value)} bytes, expected one of {sorted(sizes)}")
    if len(value) > limit:
        raise _fail(event, name, f"{len(value)} bytes, at most {limit} allowed")
    return value


def _scalars(event: str, name: str, value: object) -> Mapping[str, Scalar]:
    """A flat, msgpack-able mapping, copied and made read-only."""
    if not isinstance(value, Mapping):
        raise _fail(event, name, f"expected a mapping, got {type(value).__name__}")
    if len(value) > MAX_ENTRIES:
        raise _fail(event, name, f"{len(value)} entries, at most {MAX_ENTRIES} allowed")
    for key, item in value.items():
        if type(key) is not str or not key or len(key) > MAX_NAME:
            raise _fail(event, name, f"key {key!r} is not a non-empty str of at most {MAX_NAME} characters")
        kind = type(item)
        if kind is int:
            if not -(1 << 63) <= item <= U64:
                raise _fail(event, name, f"{key}={item} does not fit 64 bits")
        elif kind is str:
            if len(item) > MAX_TEXT:
                raise _fail(event, name, f"{key}: string of {len(item)} characters, at most {MAX_TEXT}")
        elif kind not in (float, bool, type(None)):
            raise _fail(event, name, f"{key}: {kind.__name__} is not int/float/str/bool/None")
    return MappingProxyType(dict(value))


def _timings(event: str, name: str, value: object) -> Mapping[str, float]:
    """Named durations in milliseconds, copied (as floats) and made read-only."""
    if not isinstance(value, Mapping):
        raise _fail(event, name, f"expected a mapping, got {type(value).__name__}")
    if len(value) > MAX_TIMINGS:
        raise _fail(event, name, f"{len(value)} entries, at most {MAX_TIMINGS} allowed")
    timings = {}
    for key, item in value.items():
        if type(key) is not str or not key or len(key) > MAX_NAME:
            raise _fail(event, name, f"key {key!r} is not a non-empty str of at most {MAX_NAME} characters")
        timings[key] = _float(event, f"{name}[{key!r}]", item)
    return MappingProxyType(timings)


def _runs(event: str, value: object, *, empty: bool = False) -> Runs:
    """Runs as ``Runs`` (a tuple of ``(address, page_count)`` tuples and their packed words);
    ``Runs`` are checked in one native pass, anything else with C-level passes first, no per-run
    Python loop (a batch holds thousands of runs)."""
    if type(value) is Runs:
        if not value and not empty:
            raise _fail(event, "runs", "must not be empty")
        try:
            check_runs(value)
        except LocalProtocolError as exc:
            raise _fail(event, "runs", str(exc)) from None
        return value
    if not isinstance(value, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise _fail(event, "runs", f"expected a sequence of (address, pages), got {type(value).__name__}")
        value = tuple(value)
    if not value:
        if empty:
            return value
        raise _fail(event, "runs", "must not be empty")
    if set(map(type, value)) != {tuple}:
        try:
            value = tuple(map(tuple, value))
        except TypeError:
            raise _fail(event, "runs", "every run must be an (address, pages) pair") from None
    if set(map(len, value)) != {2}:
        raise _fail(event, "runs", "every run must be an (address, pages) pair")
    addresses, counts = zip(*value)
    if set(map(type, addresses)) != {int} or set(map(type, counts)) != {int}:
        raise _fail(event, "runs", "addresses and page counts must be ints")
    if min(addresses) < 0 or max(addresses) > U64:
        raise _fail(event, "runs", "an address is outside the 64-bit range")
    if min(counts) < 1 or max(counts) > U32:
        raise _fail(event, "runs", f"page counts must be in [1, {U32}]")
    return Runs.pack(value)


def _freeze(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _own_runs(event: Event, name: str) -> None:
    """Check ``event.runs`` (``_runs``) and keep them as the tuple of tuples it returns."""
    runs = _runs(name, event.runs)
    if runs is not event.runs:
        _freeze(event, "runs", runs)


# --- the events --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello(Event):
    """First frame in each direction: versions, page size, features, and the handshake.

    Set ``version``, ``page_size``, ``features`` and (source) ``streams``; ``Connection.send``
    fills in the handshake fields (``auth`` … ``proof``) and refuses a Hello that sets them.
    Received Hellos show the peer's values.
    """

    version: int = PROTOCOL_VERSION
    page_size: int = PAGE_SIZE
    features: tuple[str, ...] = ()
    streams: int = 1            # connections the source opens for this session (1 = just this one)
    auth: bool = False          # the sender holds a token and requires authentication
    recorded: bool = False      # a recorded stream (checkpoint image), not a live peer
    nonce: bytes = b""          # fresh per connection: makes every session key unique
    session: bytes = b""        # the session a parallel stream joins (DEST: the session's id)
    stream: int = 0             # index of this connection within its session
    proof: bytes = b""          # HMAC proving knowledge of the token over both Hellos

    def __post_init__(self) -> None:
        _int("Hello", "version", self.version, 0, 255)
        _int("Hello", "page_size", self.page_size, 512, 1 << 30)
        if self.page_size & (self.page_size - 1):
            raise _fail("Hello", "page_size", f"{self.page_size} is not a power of two")
        if not isinstance(self.features, tuple):
            raise _fail("Hello", "features", f"expected a tuple of str, got {type(self.features).__name__}")
        if len(self.features) > 64:
            raise _fail("Hello", "features", f"{len(self.features)} features, at most 64")
        for feature in self.features:
            _str("Hello", "features", feature)
        _int("Hello", "streams", self.streams, 1, 64)
        _bool("Hello", "auth", self.auth)
        _bool("Hello", "recorded", self.recorded)
        _bytes("Hello", "nonce", self.nonce, (0, NONCE_SIZE))
        _bytes("Hello", "session", self.session, (0, SESSION_ID_SIZE))
        _int("Hello", "stream", self.stream, 0, 63)
        _bytes("Hello", "proof", self.proof, (0, 32))

    @property
    def handshake_fields_set(self) -> bool:
        return bool(self.auth or self.recorded or self.nonce or self.session or self.stream or self.proof)


@dataclass(frozen=True, kw_only=True, slots=True)
class Auth(Event):
    """The source's answer to the destination's Hello (the proof is filled in by ``send``)."""

    proof: bytes = b""

    def __post_init__(self) -> None:
        _bytes("Auth", "proof", self.proof, (0, 32))


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout(Event):
    """The guest's migratable memory. Sent once, before any page; every run is checked against it.

    ``regions`` are sorted, non-overlapping and page aligned. ``meta`` is a flat mapping (str to
    int/float/str/bool/None): migration id, tracker name, guest settings, image parent id.
    """

    regions: tuple[Region, ...]
    page_size: int = PAGE_SIZE
    meta: Mapping[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _int("Layout", "page_size", self.page_size, 512, 1 << 30)
        if self.page_size & (self.page_size - 1):
            raise _fail("Layout", "page_size", f"{self.page_size} is not a power of two")
        regions = self.regions
        if not isinstance(regions, tuple):
            if not isinstance(regions, Iterable):
                raise _fail("Layout", "regions", f"expected a tuple of Region, got {type(regions).__name__}")
            regions = tuple(regions)
            _freeze(self, "regions", regions)
        mask = self.page_size - 1
        end = 0
        for region in regions:
            if type(region) is not Region:
                raise _fail("Layout", "regions", f"expected Region, got {type(region).__name__}")
            start, length = region.start, region.length
            if type(start) is not int or type(length) is not int:
                raise _fail("Layout", "regions", f"{region} has non-int bounds")
            if start < 0 or start & mask or length & mask or length <= 0:
                raise _fail("Layout", "regions", f"{region} is empty, negative or not page aligned")
            if start < end:
                raise _fail("Layout", "regions", f"{region} overlaps or precedes the region before it")
            end = start + length
            if end > U64 + 1:
                raise _fail("Layout", "regions", f"{region} ends beyond the 64-bit range")
        _freeze(self, "meta", _scalars("Layout", "meta", self.meta))

    @property
    def total_bytes(self) -> int:
        return sum(r.length for r in self.regions)


@dataclass(frozen=True, kw_only=True, slots=True)
class Pages(Event):
    """Page contents: ``payload`` is the raw pages of ``runs`` concatenated in order.

    Compression is the codec's business: callers always see raw bytes. ``send`` may return before
    the payload is compressed and written, so do not modify the buffer after handing it over.
    """

    round: int
    runs: tuple[Run, ...]
    payload: bytes | bytearray | memoryview

    def __post_init__(self) -> None:
        _int("Pages", "round", self.round, 0, U32)
        runs = _runs("Pages", self.runs)
        if runs is not self.runs:
            _freeze(self, "runs", runs)
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise _fail("Pages", "payload", f"expected bytes, got {type(self.payload).__name__}")
        pages = self.pages
        size = self.payload.nbytes if isinstance(self.payload, memoryview) else len(self.payload)
        if size == 0 or size % pages:
            raise _fail("Pages", "payload", f"{size} bytes is not a whole page size for {pages} pages")

    @property
    def pages(self) -> int:
        return count_pages(self.runs)


@dataclass(frozen=True, kw_only=True, slots=True)
class Zero(Event):
    """Pages known to be zero (or never touched): no bytes travel for them."""

    round: int
    runs: tuple[Run, ...]

    def __post_init__(self) -> None:
        _int("Zero", "round", self.round, 0, U32)
        _own_runs(self, "Zero")

    @property
    def pages(self) -> int:
        return count_pages(self.runs)


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundEnd(Event):
    """Every page of round ``round`` (``pages`` of them, Pages and Zero) has been sent.

    ``final`` marks the round sent after Freeze: the destination does not acknowledge it (the
    digests follow), while it answers every other RoundEnd with ``Ack(of=Acked.ROUND)`` once
    the round is applied. The state tables allow a final RoundEnd only after Freeze, and no
    other one there.
    """

    round: int
    pages: int = 0
    final: bool = False

    def __post_init__(self) -> None:
        _int("RoundEnd", "round", self.round, 0, U32)
        _int("RoundEnd", "pages", self.pages)
        _bool("RoundEnd", "final", self.final)


@dataclass(frozen=True, kw_only=True, slots=True)
class Freeze(Event):
    """The source guest is stopped; what follows is the final round ``round``."""

    round: int

    def __post_init__(self) -> None:
        _int("Freeze", "round", self.round, 0, U32)


@dataclass(frozen=True, kw_only=True, slots=True)
class Discard(Event):
    """Post-copy: these pages are stale on the destination, whose copy must drop them so that its
    guest faults on them; each arrives later (pushed, or fetched on a ``Request``). Sent before the
    freeze for what the last scan found, and after it for what the guest wrote since."""

    round: int
    runs: tuple[Run, ...]

    def __post_init__(self) -> None:
        _int("Discard", "round", self.round, 0, U32)
        _own_runs(self, "Discard")

    @property
    def pages(self) -> int:
        return count_pages(self.runs)


@dataclass(frozen=True, kw_only=True, slots=True)
class Switch(Event):
    """Post-copy's switch: every page not discarded is current on the destination. It answers
    ``Ack(of=Acked.SWITCH)`` once its guest would fault on every discarded page (``pages`` of
    them); the source then commits, and the discarded pages follow the commit, ended by the
    page ``Digest``."""

    round: int
    pages: int

    def __post_init__(self) -> None:
        _int("Switch", "round", self.round, 0, U32)
        _int("Switch", "pages", self.pages)


@dataclass(frozen=True, kw_only=True, slots=True)
class Request(Event):
    """Post-copy: the destination's guest faulted on these pages (and a window around them): send
    them ahead of the background push."""

    runs: tuple[Run, ...]

    def __post_init__(self) -> None:
        _own_runs(self, "Request")

    @property
    def pages(self) -> int:
        return count_pages(self.runs)


@dataclass(frozen=True, kw_only=True, slots=True)
class Resume(Event):
    """First after the handshake of a session that continues migration ``migration``'s post-copy,
    cut off after its commit: the Layout follows (the same), then the destination lists what it
    still lacks (``Lacking``) and acknowledges (``Ack(of=Acked.RESUME)``)."""

    migration: str

    def __post_init__(self) -> None:
        _str("Resume", "migration", self.migration)


@dataclass(frozen=True, kw_only=True, slots=True)
class Lacking(Event):
    """A resumed post-copy: pages the destination does not have, whatever was sent before the
    cut; the source sends each again."""

    runs: tuple[Run, ...]

    def __post_init__(self) -> None:
        _own_runs(self, "Lacking")


@dataclass(frozen=True, kw_only=True, slots=True)
class Digest(Event):
    """A digest of what was sent, for the other side to compare.

    ``last`` is False on every digest but the last of the switch-over: the destination gives
    its verdict (``Ack(of=Acked.DIGEST)``) after the last one only.
    """

    kind: DigestKind
    value: bytes
    last: bool = True

    def __post_init__(self) -> None:
        _enum("Digest", "kind", self.kind, DigestKind)
        _bytes("Digest", "value", self.value)
        _bool("Digest", "last", self.last)


@dataclass(frozen=True, kw_only=True, slots=True)
class Commit(Event):
    """The point of no return: the destination may resume its guest; the source never will."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack(Event):
    """The destination's answer to ``of``.

    ``reason`` says why, when ``ok`` is False (one line for humans; empty when ok). ``round``
    is the round acknowledged (``Acked.ROUND`` only). ``ready_ms`` (``Acked.LAYOUT`` only) is
    the time the destination spent between the Layout and this Ack: the source takes it off the
    exchange to learn the link's round trip. ``timings_ms`` are the destination's measurements
    (digests, self-check, resume), reported by the source and never acted on.
    """

    of: Acked
    ok: bool
    reason: str = ""
    round: int = 0
    ready_ms: float = 0.0
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _enum("Ack", "of", self.of, Acked)
        _bool("Ack", "ok", self.ok)
        _str("Ack", "reason", self.reason, MAX_TEXT, empty=True)
        if self.ok and self.reason:
            raise _fail("Ack", "reason", "given on an Ack that is ok (a reason explains a refusal)")
        _int("Ack", "round", self.round, 0, U32)
        if self.round and self.of is not Acked.ROUND:
            raise _fail("Ack", "round", f"set on an Ack of {self.of.value} (only an Ack of round names one)")
        _freeze(self, "ready_ms", _float("Ack", "ready_ms", self.ready_ms))
        if self.ready_ms and self.of is not Acked.LAYOUT:
            raise _fail("Ack", "ready_ms", f"set on an Ack of {self.of.value} (only an Ack of layout carries it)")
        _freeze(self, "timings_ms", _timings("Ack", "timings_ms", self.timings_ms))


@dataclass(frozen=True, kw_only=True, slots=True)
class Abort(Event):
    """Either side gives up before the commit is acknowledged; ``reason`` is one line for humans."""

    reason: str

    def __post_init__(self) -> None:
        _str("Abort", "reason", self.reason, MAX_TEXT, empty=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class Fence(Event):
    """Parallel streams, at each barrier: on the primary stream, the barrier after it waits until
    stream k has delivered ``frames[k]`` data frames (Pages/Zero) in total; on the other streams,
    what follows waits until that barrier is delivered. The transport sends and consumes these."""

    frames: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.frames, tuple) or not 1 <= len(self.frames) <= 64:
            raise _fail("Fence", "frames", "expected a tuple of 1 to 64 counts")
        for count in self.frames:
            _int("Fence", "frames", count)


@dataclass(frozen=True, kw_only=True, slots=True)
class IndexEntry:
    """Where one frame of a recorded stream lies, and what it holds."""

    offset: int
    length: int
    kind: str       # event type name
    round: int = 0
    pages: int = 0

    def __post_init__(self) -> None:
        _int("IndexEntry", "offset", self.offset)
        _int("IndexEntry", "length", self.length, 1, U32)
        _str("IndexEntry", "kind", self.kind)
        _int("IndexEntry", "round", self.round, 0, U32)
        _int("IndexEntry", "pages", self.pages, 0, U32)


@dataclass(frozen=True, kw_only=True, slots=True)
class Index(Event):
    """Last frame of a recorded stream: one entry per frame before it (entry i is frame seq i)."""

    entries: tuple[IndexEntry, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.entries, tuple):
            raise _fail("Index", "entries", f"expected a tuple, got {type(self.entries).__name__}")
        offset = 0
        for entry in self.entries:
            if type(entry) is not IndexEntry:
                raise _fail("Index", "entries", f"expected IndexEntry, got {type(entry).__name__}")
            if entry.offset != offset:
                raise _fail("Index", "entries", f"frame at {entry.offset} does not follow the one ending at {offset}")
            offset += entry.length


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionClosed(Event):
    """The peer's byte stream ended between two frames (``receive_data(b"")``).

    ``expected`` is False when the protocol did not allow the stream to end there (for
    instance before the commit was acknowledged): the transport reports that as a failure.
    """

    expected: bool = True


EVENT_TYPES: tuple[type[Event], ...] = (
    Hello, Auth, Layout, Pages, Zero, RoundEnd, Freeze, Digest, Commit, Ack, Abort, Fence, Index,
    Discard, Switch, Request, Resume, Lacking,
)
DATA_EVENTS = (Pages, Zero)   # may be spread over parallel streams; everything else is a barrier
