"""Named deadlines: a timeout says which phase ran out of time."""

import pytest
import trio

from migrator.core.deadlines import deadline
from migrator.core.errors import DeadlineExceeded
from migrator.core.failures import describe


async def test_deadline_names_the_phase_and_its_limit():
    with pytest.raises(DeadlineExceeded) as caught:
        with deadline(0.01, "round 3 (--round-timeout)"):
            await trio.sleep_forever()
    assert str(caught.value) == "round 3 (--round-timeout) took more than 0.01 s"
    assert describe(caught.value) == str(caught.value)


async def test_deadline_passes_other_errors_and_results_through():
    with deadline(5, "quick"):
        await trio.sleep(0)
    with pytest.raises(KeyError):
        with deadline(5, "quick"):
            raise KeyError("x")
