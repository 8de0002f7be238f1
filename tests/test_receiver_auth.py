"""Authentication on by default, loopback included: ``migrator receive`` and ``migrator migrate``
without a token option, a wrong token, and ``--insecure`` on both ends or on one only.

Real CLIs, real guests, loopback TCP. Each test has its own ``XDG_RUNTIME_DIR`` (conftest), so
the default token file is the test's.
"""

from __future__ import annotations

import functools
import os
import stat
from contextlib import asynccontextmanager

import pytest
import trio

from harness.hosts import Loopback, start_migrate, start_receiver, write_token
from migrator.core.tokens import ensure_default_token
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest

MiB = 1 << 20


@asynccontextmanager
async def scene(sockdir, *, receiver_args=(), timeout: float = 90):
    """A receiver serving many migrations on 127.0.0.1, and a way to start guests."""
    guests = []

    async def guest(name: str):
        spawned = await trio.to_thread.run_sync(functools.partial(
            spawn_guest, os.path.join(sockdir, f"{name}.sock"), size=16 * MiB, dirty_rate=500, fill="text",
            extra_args=["--exit-with-parent"],
        ))
        guests.append(spawned)
        return spawned

    try:
        with Loopback() as bed, trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                receiver = await start_receiver(nursery, bed, sockdir, token_file=None, once=False, extra=receiver_args)
                yield bed, nursery, receiver, guest
                nursery.cancel_scope.cancel()
    finally:
        for spawned in guests:
            await trio.to_thread.run_sync(spawned.kill)


def quit_resumed(report: dict) -> None:
    with GuestClient(report["guest_control"]) as client:
        client.quit()


def error_lines(child) -> list[str]:
    return [line for line in child.stderr.lines if line.strip()]


async def test_receive_makes_a_private_token_that_migrate_finds(sockdir, private_runtime_dir):
    path = private_runtime_dir / "migrator" / "token"
    async with scene(sockdir) as (bed, nursery, receiver, guest):
        line = await receiver.stderr.wait_for("token ")
        assert f"token {path} (new)" in line and "--token-file" in line
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
        assert len(path.read_bytes().strip()) == 64

        source = await guest("src")
        migrate = await start_migrate(nursery, bed, source.control, receiver.address, token_file=None, extra=["--quiet"])
        assert await migrate.wait(60) == 0, migrate.stderr.lines
        dest = await receiver.wait_report()
        assert dest["result"] == "resumed"
        await trio.to_thread.run_sync(quit_resumed, dest)

        # a source with another token is refused before any page: one line on each side
        start = len(receiver.stderr.lines)
        other = await guest("other")
        migrate = await start_migrate(nursery, bed, other.control, receiver.address,
                                      token_file=write_token(sockdir, "wrong"), extra=["--quiet"])
        assert await migrate.wait(30) == 1
        assert len(error_lines(migrate)) == 1 and "does not know the token" in error_lines(migrate)[0], migrate.stderr.lines
        # the source checks the receiver's proof first, and hangs up on it
        refused = await receiver.stderr.wait_for("failed", start=start)
        assert "closed the connection in state DEST_HELLO" in refused
        assert other.alive() and "receiving" not in " ".join(receiver.stderr.lines[start:])

    # the next receiver of this user reuses the token: copies made of it stay good
    async with scene(sockdir) as (bed, nursery, receiver, guest):
        assert f"token {path} (existing)" in await receiver.stderr.wait_for("token ")


async def test_insecure_on_both_ends_migrates_without_a_token(sockdir, private_runtime_dir):
    async with scene(sockdir, receiver_args=["--insecure"]) as (bed, nursery, receiver, guest):
        assert "authentication off" in await receiver.stderr.wait_for("--insecure")
        source = await guest("src")
        migrate = await start_migrate(nursery, bed, source.control, receiver.address, token_file=None,
                                      extra=["--quiet", "--insecure"])
        assert await migrate.wait(60) == 0, migrate.stderr.lines
        dest = await receiver.wait_report()
        assert dest["result"] == "resumed"
        await trio.to_thread.run_sync(quit_resumed, dest)
    assert not (private_runtime_dir / "migrator" / "token").exists(), "an insecure receiver makes no token"


@pytest.mark.parametrize("insecure_end", ["receiver", "source"])
async def test_insecure_on_one_end_only_fails_in_one_line(sockdir, insecure_end):
    ensure_default_token()   # the other end has a token to offer or require
    receiver_args = ["--insecure"] if insecure_end == "receiver" else []
    source_args = ["--insecure"] if insecure_end == "source" else []
    async with scene(sockdir, receiver_args=receiver_args) as (bed, nursery, receiver, guest):
        start = len(receiver.stderr.lines)
        source = await guest("src")
        migrate = await start_migrate(nursery, bed, source.control, receiver.address, token_file=None,
                                      extra=["--quiet", *source_args])
        assert await migrate.wait(30) == 1
        lines = error_lines(migrate)
        assert len(lines) == 1 and "is --insecure given to one end only" in lines[0], lines
        refused = await receiver.stderr.wait_for("failed", start=start)
        assert ("but this side has none" if insecure_end == "receiver" else "a token is required here") in refused
        await trio.sleep(0.3)
        logged = receiver.stderr.lines[start:]
        assert [x for x in logged if "failed" in x] == [refused], logged
        assert "receiving" not in " ".join(logged), "no restore guest for an unauthenticated source"
        assert source.alive()


async def test_migrate_without_a_token_file_says_where_it_looked(sockdir, private_runtime_dir):
    async with scene(sockdir, receiver_args=["--insecure"]) as (bed, nursery, receiver, guest):
        source = await guest("src")
        migrate = await start_migrate(nursery, bed, source.control, receiver.address, token_file=None, extra=["--quiet"])
        assert await migrate.wait(30) == 1
        lines = error_lines(migrate)
        assert len(lines) == 1 and f"no token at {private_runtime_dir / 'migrator' / 'token'}" in lines[0], lines
        assert source.alive()
