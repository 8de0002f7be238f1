from migrator.core import buffers
from migrator.core.buffers import BufferPool


def _view(pool: BufferPool) -> memoryview:
    return memoryview(pool.take())[:8]


def test_a_buffer_is_reused_only_once_no_view_holds_it():
    assert buffers._REFS_FREE is not None, "this interpreter should expose views in refcounts"
    pool = BufferPool(64)
    first = _view(pool)
    second = _view(pool)
    assert first.obj is not second.obj          # still viewed: not handed out twice
    first_id = id(first.obj)
    first[:] = b"\x01" * 8
    del first
    third = _view(pool)
    assert id(third.obj) == first_id            # released: reused, no new allocation
    assert pool.allocated == 2
