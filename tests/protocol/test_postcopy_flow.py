"""The post-copy flow through both sides' state tables: Discard, Switch and its Ack, Commit and its
Ack, stale pages both ways (pushed and requested), the page Digest and the verdict that ends it."""

import pytest

from migrator.core.errors import LocalProtocolError
from migrator.protocol import (
    Abort, Ack, Acked, Commit, Digest, DigestKind, Discard, Freeze, Lacking, Pages, Request, Resume, RoundEnd, State,
    Switch,
)
from migrator.protocol._wire import decode_fields, encode_meta

from .helpers import LAYOUT, ConnectionPair, D, S

BASE = LAYOUT.regions[0].start
PAGE = b"\x5a" * 4096


def switched() -> ConnectionPair:
    p = ConnectionPair()
    p.open()
    p.send(S, [Pages(round=0, runs=((BASE, 1),), payload=PAGE), RoundEnd(round=0, pages=1)])
    p.send(D, Ack(of=Acked.ROUND, ok=True))
    p.send(S, Discard(round=1, runs=((BASE, 1),)))       # what the last scan found, before the freeze
    p.send(S, [Freeze(round=1), Discard(round=1, runs=((BASE + 4096, 2),)), Switch(round=1, pages=3)])
    assert p.conn[S].state is p.conn[D].state is State.SWITCHING
    return p


def test_a_postcopy_session_runs_to_done():
    p = switched()
    p.send(D, Ack(of=Acked.SWITCH, ok=True))
    assert p.conn[S].state is State.SWITCHED
    p.send(S, Commit())
    p.send(D, Request(runs=((BASE + 4096, 1),)))          # a fault before the commit's Ack is sent
    p.send(D, Ack(of=Acked.COMMIT, ok=True))
    assert p.conn[S].state is p.conn[D].state is State.POSTCOPY
    p.send(S, Pages(round=1, runs=((BASE + 4096, 1),), payload=PAGE))    # the requested page
    p.send(D, Request(runs=((BASE + 8192, 1),)))
    p.send(S, [Pages(round=1, runs=((BASE, 1), (BASE + 8192, 1)), payload=PAGE * 2),
               RoundEnd(round=1, pages=3, final=True), Digest(kind=DigestKind.PAGES, value=b"d" * 16)])
    p.send(D, Ack(of=Acked.DIGEST, ok=True))
    assert p.conn[S].state is p.conn[D].state is State.DONE


def test_no_commit_before_the_switch_is_acknowledged():
    p = switched()
    with pytest.raises(LocalProtocolError, match="Commit from source is not allowed in state SWITCHING"):
        p.conn[S].send(Commit())


def test_a_refused_switch_leads_to_an_abort():
    p = switched()
    p.send(D, Ack(of=Acked.SWITCH, ok=False, reason="no userfaultfd"))
    p.send(S, Abort(reason="destination refused the switch"))
    assert p.conn[S].state is p.conn[D].state is State.ABORTED_BY_SOURCE


def test_requests_come_only_after_a_switch():
    p = ConnectionPair()
    p.open()
    with pytest.raises(LocalProtocolError, match="Request from dest is not allowed in state PRECOPY"):
        p.conn[D].send(Request(runs=((BASE, 1),)))
    with pytest.raises(LocalProtocolError, match="Switch from source is not allowed in state PRECOPY"):
        p.conn[S].send(Switch(round=1, pages=0))


@pytest.mark.parametrize("event", [
    Discard(round=3, runs=((BASE, 5), (BASE + 8 * 4096, 1))),
    Switch(round=3, pages=6),
    Request(runs=((BASE, 2),)),
])
def test_postcopy_events_round_trip_their_fields(event):
    assert type(event)(**decode_fields(type(event), encode_meta(event))) == event


@pytest.mark.parametrize("make", [
    lambda: Discard(round=1, runs=()),
    lambda: Request(runs=((BASE, 0),)),
    lambda: Switch(round=1, pages=-1),
])
def test_bad_postcopy_events_are_refused(make):
    with pytest.raises(LocalProtocolError):
        make()


def test_a_resumed_session_lists_what_is_lacking_then_goes_on_as_postcopy():
    p = ConnectionPair()
    p.handshake()
    p.send(S, [Resume(migration="m-1"), LAYOUT])
    assert p.conn[S].state is p.conn[D].state is State.RESUMED
    p.send(D, [Lacking(runs=((BASE, 2),)), Ack(of=Acked.RESUME, ok=True)])
    assert p.conn[S].state is State.POSTCOPY
    p.send(S, [Pages(round=1, runs=((BASE, 2),), payload=PAGE * 2), RoundEnd(round=1, pages=2, final=True),
               Digest(kind=DigestKind.PAGES, value=b"d" * 16)])
    p.send(D, Ack(of=Acked.DIGEST, ok=True))
    assert p.conn[S].state is p.conn[D].state is State.DONE


def test_no_pages_before_the_destination_said_what_it_lacks():
    p = ConnectionPair()
    p.handshake()
    p.send(S, [Resume(migration="m-1"), LAYOUT])
    with pytest.raises(LocalProtocolError, match="Pages from source is not allowed in state RESUMED"):
        p.conn[S].send(Pages(round=1, runs=((BASE, 1),), payload=PAGE))


def test_lacking_runs_outside_the_layout_are_refused():
    p = ConnectionPair()
    p.handshake()
    p.send(S, [Resume(migration="m-1"), LAYOUT])
    with pytest.raises(LocalProtocolError, match="outside layout"):
        p.conn[D].send(Lacking(runs=((BASE - 4096, 1),)))
