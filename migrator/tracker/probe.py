"""What this machine offers for tracking, checked for real (``migrator probe`` prints it).

Every answer comes from trying the feature on scratch memory of this process or a scratch child,
never from version numbers alone, and never by writing to a write-protected page.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass

from .features import (
    feature_names,
    pagemap_scan_missing,
    soft_dirty_missing,
    sync_wp_missing,
    userfaultfd_access,
    userfaultfd_features,
    wp_async_missing,
)
from .memory import ProcessMemory

CAP_SYS_PTRACE = 19


@dataclass(frozen=True, slots=True)
class ReadRights:
    """Whether this user may read another process's memory (pagemap, process_vm_readv)."""

    euid: int
    cap_sys_ptrace: bool
    yama_ptrace_scope: int | None   # None: no Yama LSM
    scope: str                      # which processes, in words
    read_child: bool                # a scratch child's pagemap and memory could be read
    read_child_error: str | None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    kernel: str
    machine: str
    userfaultfd: bool
    userfaultfd_via: str | None     # "syscall" or "/dev/userfaultfd"
    features: tuple[str, ...]       # what UFFDIO_API advertises
    wp_async: bool                  # WP_ASYNC in effect (PM_SCAN_CHECK_WPASYNC on a scratch page)
    sync_wp: bool
    pagemap_scan: bool
    soft_dirty: bool
    read_rights: ReadRights
    tracker: str                    # what open_tracker users should pick here
    reasons: dict[str, str]         # feature -> why it is missing (only missing ones)

    def as_dict(self) -> dict:
        result = asdict(self)
        result["features"] = list(self.features)
        return result


def probe() -> ProbeResult:
    from . import choose_tracker

    via, uffd_reason = userfaultfd_access()
    missing = {
        "userfaultfd": uffd_reason,
        "wp_async": wp_async_missing(),
        "sync_wp": sync_wp_missing(),
        "pagemap_scan": pagemap_scan_missing(),
        "soft_dirty": soft_dirty_missing(),
    }
    return ProbeResult(
        kernel=platform.release(),
        machine=platform.machine(),
        userfaultfd=via is not None,
        userfaultfd_via=via,
        features=tuple(feature_names(userfaultfd_features())),
        wp_async=missing["wp_async"] is None,
        sync_wp=missing["sync_wp"] is None,
        pagemap_scan=missing["pagemap_scan"] is None,
        soft_dirty=missing["soft_dirty"] is None,
        read_rights=read_rights(),
        tracker=choose_tracker(),
        reasons={k: v for k, v in missing.items() if v},
    )


def read_rights() -> ReadRights:
    euid = os.geteuid()
    cap = _has_capability(CAP_SYS_PTRACE)
    scope = _yama_scope()
    if scope == 3:
        words = "none (kernel.yama.ptrace_scope=3 forbids ptrace to everyone)"
    elif cap:
        words = "any process (CAP_SYS_PTRACE)"
    elif scope == 2:
        words = "none (kernel.yama.ptrace_scope=2 requires CAP_SYS_PTRACE)"
    elif scope == 1:
        words = "own descendants, or processes that allow it with prctl(PR_SET_PTRACER)"
    else:
        words = "any process of the same user"
    ok, error = _read_scratch_child()
    return ReadRights(euid, cap, scope, words, ok, error)


def _has_capability(bit: int) -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _yama_scope() -> int | None:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read())
    except OSError:
        return None


def _read_scratch_child() -> tuple[bool, str | None]:
    """Open a child's pagemap and read one page of its stack: the rights a tracker needs."""
    child = subprocess.Popen([sys.executable, "-S", "-c", "import sys; sys.stdin.buffer.read(1)"],
                             stdin=subprocess.PIPE)
    try:
        with open(f"/proc/{child.pid}/maps") as maps:
            stack = next((line for line in maps if line.rstrip().endswith("[stack]")), None)
        if stack is None:
            return False, "the scratch child has no [stack] mapping"
        start = int(stack.split("-")[0], 16)
        with open(f"/proc/{child.pid}/pagemap", "rb"):
            pass
        ProcessMemory(child.pid).read(start, 4096)
        return True, None
    except OSError as exc:
        return False, str(exc)
    finally:
        child.stdin.close()
        child.wait()
