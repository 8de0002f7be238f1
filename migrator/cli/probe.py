"""Report which kernel features and trackers work on this machine (``migrator probe [--json]``).

Everything is tried for real on scratch memory: userfaultfd creation, the features UFFDIO_API
advertises, whether WP_ASYNC is in effect (PM_SCAN_CHECK_WPASYNC), PAGEMAP_SCAN, soft-dirty, and
whether this user may read another process's memory. Exit status 0 if some tracker other than
``full`` works, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json

from ..tracker.probe import ProbeResult, probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    result = probe()
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return 0 if result.tracker != "full" else 1


def render(result: ProbeResult) -> str:
    def yes(ok: bool, key: str, detail: str = "") -> str:
        if ok:
            return "yes" + (f" ({detail})" if detail else "")
        return f"no: {result.reasons.get(key, 'unavailable')}"

    rights = result.read_rights
    scope = "absent" if rights.yama_ptrace_scope is None else str(rights.yama_ptrace_scope)
    rows = [
        ("kernel", f"{result.kernel} ({result.machine})"),
        ("userfaultfd", yes(result.userfaultfd, "userfaultfd", f"via {result.userfaultfd_via}")),
        ("uffd features", ", ".join(result.features) or "-"),
        ("WP_ASYNC in effect", yes(result.wp_async, "wp_async", "checked with PM_SCAN_CHECK_WPASYNC")),
        ("sync write-protect", yes(result.sync_wp, "sync_wp")),
        ("PAGEMAP_SCAN", yes(result.pagemap_scan, "pagemap_scan")),
        ("soft-dirty", yes(result.soft_dirty, "soft_dirty")),
        ("may read", f"{rights.scope} (euid {rights.euid}, CAP_SYS_PTRACE {'yes' if rights.cap_sys_ptrace else 'no'}, "
                     f"yama ptrace_scope {scope})"),
        ("read a child", "yes" if rights.read_child else f"no: {rights.read_child_error}"),
        ("tracker", result.tracker),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
