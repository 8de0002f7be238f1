"""Rule 1: everything that decides which event may come next lives here, as data.

Both sides of a session walk the same state machine: every transition is keyed by *who sends*
the event (``Role.SOURCE`` or ``Role.DEST``) and its symbol, so a side applies its own sends and
its receives to one table. The two directions are independent byte streams; the tables accept
every interleaving the flow allows (the destination may Ack or Digest while pages still flow).

Symbols are event type names, refined by the typed fields the flow turns on (``symbol`` makes
them, from the event's values): ``Ack(layout)`` … ``Ack(commit)`` (``Ack.of``: an Ack of commit,
and only that, completes COMMITTING, and is allowed nowhere else), ``RoundEnd(final)`` (the
round after Freeze, the only RoundEnd allowed there), ``JoinHello`` (a source's Hello that joins
an existing session as a parallel stream), and ``Closed`` (the peer's clean EOF). A ``*`` entry
matches any symbol from that sender, for received frames only: they are checked (MAC, sequence)
and then dropped. That is how stragglers the peer sent before it saw our Abort are absorbed.
"""

from __future__ import annotations

import enum

from ..core.errors import LocalProtocolError
from .events import Ack, Acked, Event, Hello, RoundEnd


class Role(enum.Enum):
    SOURCE = "source"
    DEST = "dest"

    @property
    def peer(self) -> Role:
        return Role.DEST if self is Role.SOURCE else Role.SOURCE


class State(enum.Enum):
    START = "START"
    SOURCE_HELLO = "SOURCE_HELLO"        # the source said Hello; the destination answers
    DEST_HELLO = "DEST_HELLO"            # both said Hello; the source proves itself (Auth)
    READY = "READY"                      # authenticated; Layout comes next
    PRECOPY = "PRECOPY"                  # rounds of pages
    FROZEN = "FROZEN"                    # the source guest is stopped: final round, digests
    COMMITTING = "COMMITTING"            # Commit sent: waiting for Ack(commit)
    SWITCHING = "SWITCHING"              # post-copy: Switch sent, waiting for Ack(switch)
    SWITCHED = "SWITCHED"                # the destination is armed: the source commits next
    POSTCOPY_COMMITTING = "POSTCOPY_COMMITTING"  # Commit sent after a Switch: waiting for Ack(commit)
    POSTCOPY = "POSTCOPY"                # the destination's guest runs; its stale pages arrive
    RESUMING = "RESUMING"                # a session continuing an interrupted post-copy: Layout next
    RESUMED = "RESUMED"                  # the destination lists what it lacks, then acknowledges
    DONE = "DONE"
    ABORTED_BY_SOURCE = "ABORTED_BY_SOURCE"
    ABORTED_BY_DEST = "ABORTED_BY_DEST"
    ABORTED = "ABORTED"                  # both sides sent Abort
    SEALED = "SEALED"                    # a recorded stream's Index was written
    JOIN_SOURCE_HELLO = "JOIN_SOURCE_HELLO"
    JOIN_DEST_HELLO = "JOIN_DEST_HELLO"
    DATA = "DATA"                        # a joined parallel stream: Pages and Zero only
    CLOSED = "CLOSED"
    ERROR = "ERROR"


S, D = Role.SOURCE, Role.DEST
ANY = "*"
FINAL_ROUND_END = "RoundEnd(final)"


def ack(of: Acked) -> str:
    """The symbol of an Ack of ``of``."""
    return f"Ack({of.value})"


def symbol(event: Event, sender: Role) -> str:
    """The symbol ``event`` from ``sender`` has in the tables."""
    kind = type(event)
    if kind is Ack:
        return ack(event.of)
    if kind is RoundEnd and event.final:
        return FINAL_ROUND_END
    if kind is Hello and sender is Role.SOURCE and event.session:
        return "JoinHello"
    return kind.__name__


_DATA = ("Pages", "Zero")
_SENT = _DATA + ("Digest", "Fence")                         # the source, in rounds and after Freeze
# The destination, after Layout: answers to the source's Layout, RoundEnd and Digest (an answer may
# cross the source's Freeze), and digests of its own. An Ack of commit only after Commit, of a
# switch only after Switch.
_NOTES = tuple(ack(of) for of in Acked if of not in (Acked.COMMIT, Acked.SWITCH, Acked.RESUME)) + ("Digest",)


def _loop(sender: Role, symbols: tuple[str, ...], state: State) -> dict:
    return {(sender, symbol): state for symbol in symbols}


_ABORTS = {(S, "Abort"): State.ABORTED_BY_SOURCE, (D, "Abort"): State.ABORTED_BY_DEST}
_EOF_OK = {(S, "Closed"): State.CLOSED, (D, "Closed"): State.CLOSED}

Table = dict[State, dict[tuple[Role, str], State]]

LIVE: Table = {
    State.START: {(S, "Hello"): State.SOURCE_HELLO, (S, "JoinHello"): State.JOIN_SOURCE_HELLO},
    State.SOURCE_HELLO: {(D, "Hello"): State.DEST_HELLO},
    State.DEST_HELLO: {(S, "Auth"): State.READY},
    State.READY: {(S, "Layout"): State.PRECOPY, (S, "Resume"): State.RESUMING, **_ABORTS},
    State.RESUMING: {(S, "Layout"): State.RESUMED, **_ABORTS},
    State.RESUMED: {(D, "Lacking"): State.RESUMED, (D, ack(Acked.RESUME)): State.POSTCOPY, **_ABORTS},
    State.PRECOPY: {
        **_loop(S, _SENT + ("RoundEnd", "Discard"), State.PRECOPY), (S, "Freeze"): State.FROZEN,
        **_loop(D, _NOTES, State.PRECOPY), **_ABORTS,
    },
    State.FROZEN: {
        **_loop(S, _SENT + (FINAL_ROUND_END, "Discard"), State.FROZEN), (S, "Commit"): State.COMMITTING,
        (S, "Switch"): State.SWITCHING, **_loop(D, _NOTES, State.FROZEN), **_ABORTS,
    },
    State.COMMITTING: {(D, ack(Acked.COMMIT)): State.DONE, (D, "Digest"): State.COMMITTING, **_ABORTS},
    # post-copy: Switch, its Ack, Commit, its Ack; then the stale pages (pushed, or requested by
    # the destination), ended by the source's page Digest and the destination's verdict on it
    State.SWITCHING: {
        **_loop(S, _SENT, State.SWITCHING), (D, ack(Acked.SWITCH)): State.SWITCHED,
        **_loop(D, _NOTES, State.SWITCHING), **_ABORTS,
    },
    State.SWITCHED: {**_loop(S, _SENT, State.SWITCHED), (S, "Commit"): State.POSTCOPY_COMMITTING, **_ABORTS},
    State.POSTCOPY_COMMITTING: {
        (D, ack(Acked.COMMIT)): State.POSTCOPY, (D, "Request"): State.POSTCOPY_COMMITTING,
        **_loop(S, _SENT, State.POSTCOPY_COMMITTING), **_ABORTS,
    },
    State.POSTCOPY: {
        **_loop(S, _SENT + (FINAL_ROUND_END,), State.POSTCOPY), **_loop(D, ("Request", "Digest"), State.POSTCOPY),
        (D, ack(Acked.DIGEST)): State.DONE, **_ABORTS,
    },
    State.DONE: dict(_EOF_OK),
    State.ABORTED_BY_SOURCE: {(D, ANY): State.ABORTED_BY_SOURCE, (D, "Abort"): State.ABORTED, **_EOF_OK},
    State.ABORTED_BY_DEST: {(S, ANY): State.ABORTED_BY_DEST, (S, "Abort"): State.ABORTED, **_EOF_OK},
    State.ABORTED: dict(_EOF_OK),
    # a parallel stream of an authenticated session (see Connection.attach)
    State.JOIN_SOURCE_HELLO: {(D, "Hello"): State.JOIN_DEST_HELLO},
    State.JOIN_DEST_HELLO: {(S, "Auth"): State.DATA},
    State.DATA: {**_loop(S, _DATA + ("Fence",), State.DATA), **_EOF_OK},
    State.CLOSED: {},
    State.ERROR: {},
}

# A checkpoint image: the source's half of the flow, without a peer, ended by an Index.
RECORDED: Table = {
    State.START: {(S, "Hello"): State.READY},
    State.READY: {(S, "Layout"): State.PRECOPY, (S, "Index"): State.SEALED},
    State.PRECOPY: {
        **_loop(S, _SENT + ("RoundEnd",), State.PRECOPY), (S, "Freeze"): State.FROZEN, (S, "Index"): State.SEALED,
    },
    State.FROZEN: {**_loop(S, _SENT + (FINAL_ROUND_END,), State.FROZEN), (S, "Index"): State.SEALED},
    State.SEALED: dict(_EOF_OK),
    State.CLOSED: {},
    State.ERROR: {},
}

# States in which data frames of joined streams may be sent (the primary's state decides).
DATA_STATES = frozenset({State.PRECOPY, State.FROZEN, State.SWITCHING, State.SWITCHED,
                         State.POSTCOPY_COMMITTING, State.POSTCOPY})


def transition(table: Table, state: State, sender: Role, symbol: str, *, received: bool) -> tuple[State, bool]:
    """The next state, and whether a received event is to be dropped (matched a ``*`` entry).

    Raises LocalProtocolError naming the event, the sender and the state.
    """
    moves = table[state]
    target = moves.get((sender, symbol))
    if target is not None:
        return target, False
    if received and (sender, ANY) in moves and symbol != "Closed":
        return moves[(sender, ANY)], True
    who = sender.value
    if state in (State.ABORTED_BY_SOURCE, State.ABORTED_BY_DEST, State.ABORTED):
        raise LocalProtocolError(f"{symbol} from {who} after the session was aborted ({state.value})")
    raise LocalProtocolError(f"{symbol} from {who} is not allowed in state {state.value}")
