"""Local live migration demo: a guest, a receiver and the migrator, all on loopback.

Starts a 512 MiB guest writing 1 % of its pages per second, a receiver (`migrator receive
--once --prepare 512M`: its restore guest started and populated ahead, as QEMU's destination is
started before the migration), migrates with `migrator migrate`, prints the round table and summary, writes
out/run.json and out/run.png, then shows that the resumed guest keeps running and passes its
self-check.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from migrator.guest.client import GuestClient
from migrator.guest.layout import parse_size
from migrator.guest.spawn import spawn_guest

PAGE = 4096


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--dirty-percent", type=float, default=1.0, help="pages written per second, in %% of the region")
    ap.add_argument("--out", default="out")
    ap.add_argument("migrate_args", nargs=argparse.REMAINDER, help="extra arguments for migrator migrate")
    args = ap.parse_args()
    size = parse_size(args.size)
    rate = size // PAGE * args.dirty_percent / 100
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="migrator-demo-")
    py = [sys.executable, "-m", "migrator"]

    print(f"demo: {size >> 20} MiB guest writing {rate:.0f} pages/s ({args.dirty_percent} % of pages per second)")
    with spawn_guest(os.path.join(work, "source.sock"), size=size, dirty_rate=rate, fill="text") as guest:
        time.sleep(0.5)
        receiver = subprocess.Popen(
            py + ["receive", "--listen", "127.0.0.1:0", "--once", "--control-dir", work, "--prepare", str(size),
                  "--report", os.path.join(args.out, "dest.json")],
            stderr=subprocess.PIPE, text=True,
        )
        # the receiver makes (or reuses) this user's token and says where; migrate finds it there
        lines = [receiver.stderr.readline() for _ in range(3)]   # token, listening on, prepared
        match = re.search(r"listening on (\S+)", lines[1])
        prepared = lines[2]
        if not match or "prepared" not in prepared:
            receiver.kill()
            print(f"demo: receiver did not start: {' '.join(line.strip() for line in lines)}", file=sys.stderr)
            return 1
        print(f"demo: {lines[0].strip()}")
        address = match.group(1)
        print(f"demo: {prepared.strip()}")
        report = os.path.join(args.out, "run.json")
        status = subprocess.call(
            py + ["migrate", "--guest", guest.control, "--to", address, "--report", report,
                  "--plot", os.path.join(args.out, "run.png"), *args.migrate_args]
        )
        rest = receiver.stderr.read()
        receiver.wait(timeout=30)
        sys.stderr.write(rest)
        resumed = re.search(r"control (\S+\.sock)", rest)
        if status != 0 or not resumed:
            print("demo: migration failed (see above); the source guest was left running" if status else "demo: no resumed guest")
            return 1
        dest = GuestClient(resumed.group(1))
        before = dest.stats()["steps"]
        time.sleep(1.0)
        after = dest.stats()
        check = dest.check()
        print(f"demo: destination guest pid {after.get('pid', '?')} ran {after['steps'] - before} steps in 1 s after "
              f"resume; self-check {'clean' if check.get('clean') else 'FAILED: ' + str(check)}")
        print(f"demo: report {report}, plot {os.path.join(args.out, 'run.png')}")
        dest.quit()
        return 0 if check.get("clean") else 1


if __name__ == "__main__":
    sys.exit(main())
