"""A receiver's status words for a migration in progress (``migrator status`` on its socket)."""

from types import SimpleNamespace

from migrator.destination.report import ReceivedRound
from migrator.destination.status import state_of


def migration(rounds=(), resumed=False, postcopy=None):
    return SimpleNamespace(rounds=list(rounds), resumed=resumed, postcopy=postcopy)


def test_the_state_follows_the_rounds_the_switch_over_and_the_resume():
    assert state_of(migration()) == "starting"
    assert state_of(migration([ReceivedRound(0, 100, False)])) == "round 1"
    assert state_of(migration([ReceivedRound(0, 100, False), ReceivedRound(1, 9, False)])) == "round 2"
    final = [ReceivedRound(0, 100, False), ReceivedRound(1, 9, True)]
    assert state_of(migration(final)) == "switch-over"
    assert state_of(migration(final, resumed=True)) == "resumed"
    assert state_of(migration([ReceivedRound(0, 100, False)], resumed=True, postcopy=object())) == "post-copy"
