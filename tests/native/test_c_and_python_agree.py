"""Where the C and the Python around it could disagree without any error being raised.

cffi already refuses to load a module whose cdef disagrees with the compiled C (a field's offset,
a #define's value), and the cdef is the very header the C includes. What is left: numbers that
Python keeps on its own beside the C, problem codes without a wording, and whether C reads each
control-block field exactly where Python writes it.
"""

from __future__ import annotations

import pytest

from migrator.core.model import PAGE_SIZE
from migrator.guest import layout
from migrator.guest.layout import Settings
from migrator.guest.mapping import RegionMapping
from migrator.guest.workload import PROBLEMS, Workload
from migrator.native import pages, workload
from migrator.protocol import _payload

lib, ffi = workload.lib, workload.ffi
CONTROL = ffi.typeof("struct guest_control")
FIELDS = dict(CONTROL.fields)


def test_python_geometry_uses_the_page_and_table_entry_c_uses():
    assert PAGE_SIZE == lib.GUEST_PAGE_SIZE
    assert layout.TABLE_ENTRIES_PER_PAGE == lib.GUEST_PAGE_SIZE // ffi.sizeof("uint64_t")


def test_payload_checks_page_sizes_against_the_unit_the_c_scan_reads():
    # a page size that is not a multiple would make find_zero_pages read past the last page
    assert _payload.ZERO_SCAN_UNIT == pages.lib.ZERO_SCAN_BYTES


def test_the_tag_buffer_holds_what_set_tag_copies():
    # Workload.set_tag copies GUEST_TAG_MAX bytes into the tag: a shorter array would overflow
    assert FIELDS["tag"].type.length == lib.GUEST_TAG_MAX
    assert ffi.sizeof(CONTROL) <= lib.GUEST_PAGE_SIZE


def test_every_problem_code_the_c_returns_has_a_wording():
    codes = {getattr(lib, name) for name in dir(lib) if name.startswith("PROBLEM_")} - {lib.PROBLEM_NONE}
    assert codes == set(PROBLEMS)


@pytest.fixture
def guest():
    """A formatted 16-page region after a few steps, and its control block as Python sees it."""
    region = Workload.create(RegionMapping(16 * PAGE_SIZE), Settings(seed=3))
    region.run(40)
    assert region.control_problem() is None
    return region, ffi.cast("struct guest_control *", region.mapping.pointer)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("layout_version", 9, "layout version 9, this guest reads version 2"),
        ("region_pages", 99, "describes 99 pages, but the region has 16"),
        ("in_flight", 45, "in-flight marker 45 does not fit step counter 40"),
        ("steps", 38, "in-flight marker 40 does not fit step counter 38"),
        ("tag_len", lib.GUEST_TAG_MAX + 7, f"tag length {lib.GUEST_TAG_MAX + 7} exceeds"),
    ],
)
def test_c_reports_the_value_python_wrote_to_a_field(guest, field, value, problem):
    region, ctl = guest
    setattr(ctl, field, value)
    assert problem in region.control_problem()


@pytest.mark.parametrize("field", [name for name in FIELDS if name != "tag"])
def test_c_checks_every_control_field_python_can_write(guest, field):
    """C validates each field but the opaque tag, or covers it by the settings checksum: were
    Python to write one where C does not read it, C would see nothing wrong."""
    region, ctl = guest
    before = getattr(ctl, field)
    setattr(ctl, field, before + 1.5 if isinstance(before, float) else before ^ 1 << 20)
    assert region.control_problem() is not None
    setattr(ctl, field, before)
    assert region.control_problem() is None
