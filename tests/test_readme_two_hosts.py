"""The README's "Two real hosts" recipe, run as written, between two network namespaces.

A newcomer follows only the README, so the test reads the recipe from README.md itself and runs
its lines in order, host B's in namespace b and host A's in namespace a, each in that host's own
directory, with the token and TLS exactly as written. It substitutes only what must differ on
one machine: host B's address (the namespace's), ``scp FILE hostX:`` (a copy into that host's
directory), ``migrator`` (this checkout's executable), the guest's size (small, to stay quick)
and its control socket (a private directory, not a fixed path shared with other runs). A line
ending in ``&`` runs in the background, as does ``migrator receive``, which serves until stopped:
the recipe's next line runs once it says it is listening.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from harness import netns
from migrator.guest.client import GuestClient
from harness.hosts import Child, start_child, steps_advance

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Two real hosts"
README_HOST_B = "10.0.0.2"
README_GUEST_SIZE = "--size 1G"
TEST_GUEST_SIZE = "--size 64M"
README_GUEST_CONTROL = "/tmp/g.sock"
MIGRATOR = os.path.join(os.path.dirname(sys.executable), "migrator")
STEP_TIMEOUT_S = 20.0           # one foreground line (certificate, migrate) or a background one getting ready
TEST_TIMEOUT_S = 60.0           # the whole recipe, teardown included

_reason = netns.unavailable()
pytestmark = [pytest.mark.faults, pytest.mark.skipif(_reason is not None, reason=str(_reason))]


@dataclass(frozen=True)
class Step:
    host: str           # "a" or "b"
    command: str        # one shell command line, continuation lines joined
    background: bool    # ends in "&", or a receiver (it serves until stopped)


def recipe(text: str) -> list[Step]:
    """The commands of the first code block under SECTION, each with the host its comment names
    ("on host A", "on host B"; "on either host" is taken as A)."""
    section = text.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 2)[1]
    joined = re.sub(r"\\\n\s*", "", block)
    steps, host = [], None
    for line in joined.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            found = re.search(r"on (host ([AB])|either host)", line)
            if found:
                host = (found.group(2) or "A").lower()
            continue
        assert host is not None, f"README {SECTION}: {line!r} comes before any 'on host X' comment"
        background = line.endswith("&")
        command = line.rstrip("&").strip()
        steps.append(Step(host, command, background or command.startswith("migrator receive ")))
    return steps


def localize(step: Step, dirs: dict[str, str], host_b: str, guest_control: str) -> str:
    """The step's command with only what must differ on this machine changed (module docstring)."""
    command = re.sub(r"\bscp (\S+) host([AB]):", lambda m: f"cp {m.group(1)} {dirs[m.group(2).lower()]}/", step.command)
    command = re.sub(r"(^|&& |; )migrator ", lambda m: f"{m.group(1)}{MIGRATOR} ", command)
    command = command.replace(README_HOST_B, host_b).replace(README_GUEST_SIZE, TEST_GUEST_SIZE)
    return command.replace(README_GUEST_CONTROL, guest_control)


def test_the_recipe_is_found_and_names_both_hosts():
    steps = recipe(README.read_text())
    assert {s.host for s in steps} == {"a", "b"}
    commands = " ".join(s.command for s in steps)
    for needed in (README_HOST_B, README_GUEST_SIZE, README_GUEST_CONTROL, "--token-file", "--tls-cert", "--tls-ca",
                   "migrator receive ", "migrator migrate ", "migrator guest "):
        assert needed in commands, f"the README's recipe no longer has {needed!r}: update this test's substitutions"


@pytest.fixture
def bed(sockdir):
    """Torn down before ``sockdir``: nothing left in the hosts writes sockets into it then."""
    with netns.Testbed() as testbed:
        yield testbed


async def test_the_readme_two_host_recipe_migrates(bed, sockdir, tmp_path):
    dirs = {h: str(tmp_path / f"host{h.upper()}") for h in "ab"}
    for d in dirs.values():
        os.makedirs(d)
    guest_control = os.path.join(sockdir, "g.sock")
    background: list[Child] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            try:
                for i, step in enumerate(recipe(README.read_text())):
                    await run_step(nursery, bed, i, step, dirs, guest_control, background)
                with open(os.path.join(dirs["a"], "run.json")) as f:
                    run = json.load(f)
                assert run["result"] == "committed" and run["verified"], run
                dest = await wait_json(os.path.join(dirs["b"], "dest.json"))
                assert dest["result"] == "resumed" and dest["id"] == run["id"], dest
                await trio.to_thread.run_sync(steps_advance, dest["guest_control"])
                await trio.to_thread.run_sync(quit_guest, dest["guest_control"])
            finally:
                await stop(background)
    # the recipe gives no --control-dir: the receiver made a temporary one, kept for the resumed guest's socket
    shutil.rmtree(os.path.dirname(dest["guest_control"]), ignore_errors=True)


async def run_step(nursery: trio.Nursery, bed: netns.Testbed, i: int, step: Step, dirs: dict[str, str],
                   guest_control: str, background: list[Child]) -> None:
    """One line of the recipe in its host's namespace and directory: a background one until it
    is ready, a foreground one to its end (it must exit 0)."""
    command = localize(step, dirs, bed.b.address, guest_control)
    name = f"host {step.host.upper()} line {i}"
    if step.background:
        child = await start_child(nursery, bed, step.host, name, ["bash", "-c", f"cd {dirs[step.host]} && exec {command}"])
        background.append(child)
        if "migrator receive " in step.command:
            await child.stderr.wait_for("listening on ", timeout=STEP_TIMEOUT_S)
        elif "migrator guest " in step.command:
            await wait_for_socket(guest_control, child)
        return
    with trio.fail_after(STEP_TIMEOUT_S):
        done = await trio.run_process(bed.argv(step.host, ["bash", "-c", command]), cwd=dirs[step.host],
                                      capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{name}: {command!r} exited {done.returncode}: {done.stderr.decode()[-2000:]}"


async def stop(children: list[Child]) -> None:
    """SIGTERM, as an operator's Ctrl-C would, so each cleans up; the testbed kills what is left."""
    with trio.CancelScope(shield=True), trio.move_on_after(STEP_TIMEOUT_S):
        for child in children:
            child.kill(signal.SIGTERM)
        for child in children:
            await child.wait(STEP_TIMEOUT_S)


def quit_guest(control: str) -> None:
    with GuestClient(control) as client:
        client.quit()


async def wait_for_socket(path: str, child: Child) -> None:
    with trio.fail_after(STEP_TIMEOUT_S):
        while not os.path.exists(path):
            assert child.process.returncode is None, f"{child.name} exited: {child.stderr.lines}"
            await trio.sleep(0.02)


async def wait_json(path: str) -> dict:
    """The JSON file at ``path`` once it is complete (the receiver writes it after logging)."""
    with trio.fail_after(STEP_TIMEOUT_S):
        while True:
            try:
                with open(path) as f:
                    return json.load(f)
            except (FileNotFoundError, json.JSONDecodeError):
                await trio.sleep(0.05)
