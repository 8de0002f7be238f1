"""``subtract``: the pure run arithmetic of merging an image into its child (table-driven)."""

import pytest

from migrator.checkpoint.chain import subtract

P = 4096


@pytest.mark.parametrize(
    ("runs", "covered", "expected"),
    [
        (((0, 4),), [], [((0, 4), 0)]),
        (((0, 4),), [(0, 4)], []),
        (((0, 4),), [(P, 2)], [((0, 1), 0), ((3 * P, 1), 3)]),
        (((0, 2), (10 * P, 3)), [(P, 10)], [((0, 1), 0), ((11 * P, 2), 3)]),
        (((5 * P, 2),), [(0, 1), (20 * P, 1)], [((5 * P, 2), 0)]),
        (((0, 8),), [(0, 1), (2 * P, 1), (7 * P, 5)], [((P, 1), 1), ((3 * P, 4), 3)]),
    ],
)
def test_subtract_keeps_the_uncovered_pages_and_their_payload_offsets(runs, covered, expected):
    assert subtract(runs, covered, [a for a, _ in covered], P) == expected
