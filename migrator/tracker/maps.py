"""A process's mappings (/proc/PID/smaps) and the checks trackers make on the regions they track.

Used on both sides: the guest refuses to register a hugetlb mapping (userfaultfd WP_ASYNC cannot
track it), and ``open_tracker`` checks that every region is page aligned, mapped, and not hugetlb
before arming, so a user gets one line naming the mapping instead of a bare EINVAL.
``smaps`` is read once per check (it costs ~6 ms per GiB of populated memory: fine at open time).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..core.errors import TrackerError, TrackerUnavailable
from ..core.model import Region


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of /proc/PID/maps plus the ``VmFlags`` smaps gives it."""

    start: int
    end: int
    perms: str
    path: str
    vmflags: frozenset[str]

    @property
    def hugetlb(self) -> bool:
        return "ht" in self.vmflags

    def describe(self) -> str:
        name = self.path or "[anonymous]"
        return f"{self.start:#x}-{self.end:#x} {self.perms} {name}"


def read_mappings(pid: int | str = "self") -> list[Mapping]:
    """All mappings of ``pid`` in address order. Raises OSError if smaps cannot be read."""
    mappings: list[Mapping] = []
    head: tuple[int, int, str, str] | None = None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            first, _, rest = line.partition(" ")
            if first == "VmFlags:":
                if head is not None:
                    mappings.append(Mapping(*head, frozenset(rest.split())))
                    head = None
            elif "-" in first and not first.endswith(":"):
                lo, hi = first.split("-")
                fields = rest.split(maxsplit=4)  # perms offset dev inode [path]
                head = (int(lo, 16), int(hi, 16), fields[0], fields[4].rstrip("\n") if len(fields) > 4 else "")
    return mappings


def normalize_regions(regions: Iterable[Region], page_size: int) -> tuple[Region, ...]:
    """Sorted regions; each page aligned, non-empty, none overlapping. TrackerError otherwise."""
    ordered = sorted(regions, key=lambda r: r.start)
    if not ordered:
        raise TrackerError("no regions to track")
    for region in ordered:
        if region.length <= 0 or region.start % page_size or region.length % page_size:
            raise TrackerError(
                f"region [{region.start:#x}, +{region.length:#x}) is not a non-empty multiple of "
                f"the {page_size}-byte page size at a page-aligned address"
            )
    for before, after in zip(ordered, ordered[1:]):
        if after.start < before.end:
            raise TrackerError(f"regions overlap: [{before.start:#x}, {before.end:#x}) and [{after.start:#x}, {after.end:#x})")
    return tuple(ordered)


def check_regions(pid: int | str, regions: Sequence[Region], *, refuse_hugetlb: bool) -> None:
    """Every region must be fully mapped in ``pid``; hugetlb ones are refused when asked.

    Raises TrackerError (a region is not mapped) or TrackerUnavailable (hugetlb), naming the
    region or the mapping.
    """
    mappings = read_mappings(pid)
    for region in regions:
        covered = region.start
        for mapping in mappings:
            if mapping.end <= covered or mapping.start >= region.end:
                continue
            if mapping.start > covered:
                break
            if refuse_hugetlb and mapping.hugetlb:
                raise TrackerUnavailable(
                    f"hugetlb mapping cannot be tracked with userfaultfd write-protect (WP_ASYNC refuses it): "
                    f"{mapping.describe()} in process {pid}"
                )
            covered = mapping.end
            if covered >= region.end:
                break
        if covered < region.end:
            raise TrackerError(
                f"region [{region.start:#x}, {region.end:#x}) is not mapped in process {pid} "
                f"(nothing mapped at {covered:#x})"
            )
