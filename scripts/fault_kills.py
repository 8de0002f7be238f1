#!/usr/bin/env python3
"""Fault suite: SIGKILL ``migrate`` (and the receiver) at random moments from round 0 to the commit.

Each trial is a fresh source guest, ``migrator receive --once`` and ``migrator migrate`` over
loopback. One of the two CLIs is SIGKILLed at a moment drawn uniformly between the start of
round 0 and the commit (both timed by calibration runs of the same scenario); half of the
``migrate`` kills then wait for the next moment the guest is stopped by its tracer, a duty-cycle
stop or the final freeze, where issue #18 found a SIGSTOP-based freeze left the guest stopped
(3 of 3 while throttled, 8 of 12 during the freeze). Once neither side acts any more, the script
looks at what is left:

  source      running (no thread stopped, step counter advancing), stopped (T), or gone
  state file  the source's committed-state file (``SOCKET.state``) names it, or not
  destination a restore guest running (resumed), or not

and counts source guests left stopped with no migration in progress and no state file (goal 0),
trials where both copies run (goal 0), and trials whose outcome the source side alone told
right: a running source without a state file means nothing moved (the destination does not
run); a stopped source with its state file, or a source the migrator killed (it does so only
after the destination's acknowledgement), means the guest moved or may have (the destination
runs, or its copy died with a receiver killed after Commit: then the workload waits, stopped, in
the source, and the state file says which migration to ask about).

Scenarios, alternating: converge (16 MiB at 2000 writes/s over 8 MB/s with a 1.5 s downtime
target: a final freeze of about a second) and auto-converge (8 MiB written without limit over
16 MB/s, --max-rounds 6: duty-cycle stops from round 2 on).

Goals: 0 stopped sources nobody can explain, 0 double runs, every outcome readable from the
source side. Usage: scripts/fault_kills.py [--runs 50] [--seed N] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from harness.bench import finish, goal
from harness.loopback import Cli, Receiver, thread_states
from migrator.core.errors import GuestError
from migrator.guest import committed
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest

MiB = 1 << 20
SETTLE_TIMEOUT_S = 60.0     # a CLI left alive must be done by then
BASELINE_STUCK = "issue #18 (SIGSTOP): 3 of 3 kills while throttled, 8 of 12 during the freeze"


@dataclass(frozen=True)
class Scenario:
    name: str
    size: int
    dirty_rate: float | None
    args: tuple[str, ...]


SCENARIOS = (
    Scenario("converge", 16 * MiB, 2000, ("--bandwidth", "8M", "--downtime-ms", "1500")),
    Scenario("auto-converge", 4 * MiB, None, ("--bandwidth", "24M", "--downtime-ms", "20", "--max-rounds", "4")),
)


@dataclass
class Outcome:
    victim: str
    scenario: str
    delay_s: float
    at_stop: bool
    guest_at_kill: str          # thread states when the kill went out ("" if the victim had exited)
    source: str                 # running / stopped / gone / ...
    state_file: bool            # a committed-state file names the source
    dest_running: bool
    dest_result: str | None
    hung: str                   # a CLI still running SETTLE_TIMEOUT_S after the kill (then killed), and its last lines

    @property
    def stuck(self) -> bool:
        return self.source == "stopped" and not self.state_file

    @property
    def both_run(self) -> bool:
        return self.source == "running" and self.dest_running

    @property
    def readable(self) -> bool:
        if self.source == "running":
            return not self.state_file and not self.dest_running
        return self.source == "gone" or (self.source == "stopped" and self.state_file)


def source_state(guest) -> str:
    if not guest.alive():
        return "gone"
    states = thread_states(guest.pid)
    if states & {"t", "T"}:
        return "stopped" if states <= {"t", "T"} else "partly stopped " + "".join(sorted(states))
    try:
        with GuestClient(guest.control, timeout=3.0) as client:
            before = client.stats()["steps"]
            time.sleep(0.3)
            return "running" if client.stats()["steps"] > before else "stalled"
    except GuestError:
        return "not answering"


def destination_running(receiver: Receiver) -> bool:
    running = False
    for name in os.listdir(receiver.control_dir):
        path = os.path.join(receiver.control_dir, name)
        try:
            with GuestClient(path, timeout=2.0) as client:
                if client.stats()["state"] == "running":
                    running = True
                client.quit()          # nothing of a trial may outlive it
        except GuestError:
            pass    # a socket left by a guest that is gone
    return running


def dest_result(receiver: Receiver) -> str | None:
    try:
        with open(receiver.report) as f:
            return json.load(f).get("result")
    except (OSError, ValueError):
        return None


def run_trial(workdir: str, scenario: Scenario, victim: str, delay_s: float, at_stop: bool) -> Outcome:
    receiver = Receiver(workdir, "--idle-timeout", "5")
    control = os.path.join(workdir, "src.sock")
    guest = spawn_guest(control, size=scenario.size, dirty_rate=scenario.dirty_rate, fill="random",
                        extra_args=["--exit-with-parent"])
    migrate = None
    try:
        migrate = Cli("migrate", "--guest", control, "--to", receiver.address, "--quiet", "--round-timeout", "30",
                      *scenario.args)
        target = migrate.started + delay_s
        while time.monotonic() < target and migrate.popen.poll() is None:
            time.sleep(0.001)
        if at_stop:
            deadline = time.monotonic() + 10
            while thread_states(guest.pid) != {"t"} and migrate.popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0002)
        child = migrate if victim == "migrate" else receiver
        states = "".join(sorted(thread_states(guest.pid)))
        at_kill = states if child.sigkill() else ""
        hung = []
        for cli in (migrate, receiver):
            try:
                cli.wait(SETTLE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                hung.append(f"{cli.popen.args[3]} hung: {' | '.join(cli.lines[-3:])}")
                cli.kill()
        source = source_state(guest)
        try:
            record = committed.read_record(control)
        except GuestError:
            record = None     # unreadable: counted as no record, so as a finding
        return Outcome(victim, scenario.name, round(delay_s, 3), at_stop, at_kill, source,
                       state_file=record is not None and (source == "gone" or record.applies_to(guest.pid)),
                       dest_running=destination_running(receiver), dest_result=dest_result(receiver),
                       hung="; ".join(hung))
    finally:
        for cli in (migrate, receiver):
            if cli is not None:
                cli.kill()
        guest.kill()
        _empty(workdir)


def calibrate(workdir: str, scenario: Scenario, runs: int = 2) -> tuple[float, float]:
    """(round 0 start, commit) in seconds after ``migrate`` starts, the means of whole runs."""
    starts, commits = [], []
    for _ in range(runs):
        receiver = Receiver(workdir, "--idle-timeout", "5")
        control = os.path.join(workdir, "src.sock")
        with spawn_guest(control, size=scenario.size, dirty_rate=scenario.dirty_rate, fill="random",
                         extra_args=["--exit-with-parent"]):
            migrate = Cli("migrate", "--guest", control, "--to", receiver.address, "--quiet", *scenario.args)
            try:
                receiver.wait_line("resumed guest", timeout=120)
                starts.append(receiver.line_time("receiving") - migrate.started)
                commits.append(receiver.line_time("resumed guest") - migrate.started)
                migrate.wait(SETTLE_TIMEOUT_S)
            finally:
                migrate.kill()
        destination_running(receiver)      # quits the resumed copy
        receiver.kill()
        _empty(workdir)
    return sum(starts) / runs, sum(commits) / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="kills of each CLI (default 50)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write results as JSON (- = stdout)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)

    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="fault-kills-", dir="/tmp") as workdir:
        windows = {s.name: calibrate(workdir, s) for s in SCENARIOS}
        for name, (start, commit) in windows.items():
            print(f"{name}: round 0 from {start:.2f} s, commit at {commit:.2f} s", file=sys.stderr)
        plan = [(victim, i) for i in range(args.runs) for victim in ("migrate", "receiver")]
        for number, (victim, i) in enumerate(plan, 1):
            scenario = SCENARIOS[i % len(SCENARIOS)]
            start, commit = windows[scenario.name]
            at_stop = victim == "migrate" and i % 4 >= 2
            outcome = run_trial(workdir, scenario, victim, rng.uniform(start, commit), at_stop)
            outcomes.append(outcome)
            flags = (" STUCK" * outcome.stuck + " BOTH-RUN" * outcome.both_run
                     + " UNREADABLE" * (not outcome.readable) + (f" [{outcome.hung}]" if outcome.hung else ""))
            print(f"#{number:3d} kill {victim:8s} {scenario.name:13s} at {outcome.delay_s:6.2f} s"
                  f"{' (next stop)' if at_stop else ''} guest [{outcome.guest_at_kill or 'victim done'}]: "
                  f"source {outcome.source}, state file {'yes' if outcome.state_file else 'no'}, "
                  f"destination {'runs' if outcome.dest_running else 'no'} ({outcome.dest_result}){flags}",
                  file=sys.stderr, flush=True)

    stuck = sum(o.stuck for o in outcomes)
    both = sum(o.both_run for o in outcomes)
    readable = sum(o.readable for o in outcomes)
    killed_stopped = sum("t" in o.guest_at_kill for o in outcomes)
    hung = sum(bool(o.hung) for o in outcomes)
    goals = [
        goal("source guests left stopped with no migration in progress (and no state file)", stuck,
             BASELINE_STUCK, 0, stuck == 0),
        goal("trials where both copies run", both, "issue #18: none, but 1 of 12 was one thaw away", 0, both == 0),
        goal("outcomes readable from the source side alone", f"{readable}/{len(outcomes)}",
             "issue #18: a stopped source looked the same committed or not", f"{len(outcomes)}/{len(outcomes)}",
             readable == len(outcomes)),
    ]
    result = {
        "seed": seed, "runs_per_victim": args.runs, "windows_s": windows,
        "kills_while_guest_stopped_by_tracer": killed_stopped,
        "trials_with_a_hung_cli": hung,
        "by_outcome": _tally(outcomes),
        "trials": [vars(o) for o in outcomes],
        "goals": goals,
    }
    print(f"\n{len(outcomes)} trials (seed {seed}), {killed_stopped} kills while the guest was stopped by its tracer, "
          f"{hung} with a CLI still running {SETTLE_TIMEOUT_S:g} s after the kill", file=sys.stderr)
    for key, count in sorted(result["by_outcome"].items()):
        print(f"  {count:4d}  {key}", file=sys.stderr)
    return finish(result, goals, args.json, file=sys.stderr)


def _empty(directory: str) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _tally(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = (f"kill {o.victim}: source {o.source}{' + state file' if o.state_file else ''}, "
               f"destination {'runs' if o.dest_running else 'discarded'}")
        counts[key] = counts.get(key, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
