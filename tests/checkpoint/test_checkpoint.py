"""Checkpoint images end to end: real guests, real kernel tracking, real files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest
import trio

from migrator.checkpoint import (
    CheckpointSettings, RestoreSettings, image_tag, load_chain, read_image, restore_chain, run_continuous,
    take_checkpoint, verify_chain,
)
from migrator.core.errors import ImageError, MigrationFailed
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.tracker.features import wp_async_missing

from checkpoint_helpers import MiB, replay_digest

pytestmark = pytest.mark.skipif(wp_async_missing() is not None, reason=f"needs userfaultfd WP_ASYNC: {wp_async_missing()}")

RUNNING = CheckpointSettings(leave_running=True)


def _assert_running(control: str) -> None:
    with GuestClient(control) as client:
        before = client.stats()["steps"]
        time.sleep(0.2)
        assert client.stats()["steps"] > before, "guest is not running"


async def _restore_and_check(image_dir: str, control_dir: str) -> dict:
    with trio.fail_after(60):
        report = (await restore_chain(image_dir, RestoreSettings(control_dir=control_dir), log=lambda line: None)).to_dict()
    assert report["result"] == "resumed" and report["verified"]
    assert "check" in report["parts_ms"], "the guest's self-check ran"
    await trio.to_thread.run_sync(_assert_running, report["guest_control"])
    with GuestClient(report["guest_control"]) as client:
        assert client.check(deep=True)["clean"]
        report["guest_stats"] = client.stats()
        client.quit()
    return report


async def test_full_and_incremental_round_trip(sockdir, tmp_path):
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=32 * MiB, dirty_rate=3000, fill="text") as guest:
        with trio.fail_after(60):
            full = (await take_checkpoint(guest.control, str(tmp_path / "c1"), RUNNING)).to_dict()
            await trio.sleep(0.4)
            with GuestClient(guest.control) as client:
                client.pause()      # hold the memory still so the image can be compared with it
                incremental = (await take_checkpoint(guest.control, str(tmp_path / "c2"), RUNNING, parent=str(tmp_path / "c1"))).to_dict()
                source_digest = client.digest()
                assert client.stats()["tag"] == image_tag(incremental["id"])
                client.resume()
        assert full["image_kind"] == "full" and incremental["image_kind"] == "incremental"
        assert full["frozen_ms"] > 0 and incremental["frozen_ms"] > 0
        chain = load_chain(str(tmp_path / "c2"))
        assert [image.kind for image in chain] == ["full", "incremental"]
        total = chain[0].total_pages
        assert 0 < chain[1].manifest["pages"]["unique"] < total // 4, "an incremental holds the written pages only"
        assert await replay_digest(str(tmp_path / "c2")) == source_digest, "the chain records the guest's memory exactly"
        assert (await verify_chain(str(tmp_path / "c2")))["verified"]
        await trio.to_thread.run_sync(_assert_running, guest.control)   # --leave-running
        await _restore_and_check(str(tmp_path / "c2"), sockdir)
        await _restore_and_check(str(tmp_path / "c1"), sockdir)


async def test_incremental_refused_unless_the_parent_scanned_last(sockdir, tmp_path):
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 * MiB, dirty_rate=1000) as guest:
        with trio.fail_after(60):
            await take_checkpoint(guest.control, str(tmp_path / "a"), RUNNING)
            await take_checkpoint(guest.control, str(tmp_path / "b"), RUNNING)      # scans again: a is stale
            with pytest.raises(ImageError, match="refusing an incremental image.*last scanned by"):
                await take_checkpoint(guest.control, str(tmp_path / "c"), RUNNING, parent=str(tmp_path / "a"))
            assert not os.path.exists(tmp_path / "c") and not any("partial" in n for n in os.listdir(tmp_path))
            settings = CheckpointSettings(leave_running=True, full_if_needed=True)
            report = (await take_checkpoint(guest.control, str(tmp_path / "c"), settings, parent=str(tmp_path / "a"))).to_dict()
        assert report["image_kind"] == "full" and "last scanned by" in report["parent_refused"]
        assert read_image(str(tmp_path / "c")).kind == "full"


async def test_a_checkpoint_that_fails_mid_stream_leaves_no_file_and_the_guest_running(sockdir, tmp_path):
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 * MiB, dirty_rate=1000) as guest:
        settings = CheckpointSettings(leave_running=True, round_timeout_s=1e-4)    # round 0 cannot finish
        with trio.fail_after(60):
            with pytest.raises(MigrationFailed, match="round 0") as failed:
                await take_checkpoint(guest.control, str(tmp_path / "x"), settings)
        assert "stream failed" not in str(failed.value) and not failed.value.committed
        assert os.listdir(tmp_path) == [], "a failed image leaves neither a directory nor a partial file"
        await trio.to_thread.run_sync(_assert_running, guest.control)


async def test_continuous_checkpoints_prune_and_every_kept_image_restores(sockdir, tmp_path):
    root = str(tmp_path / "chain")
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 * MiB, dirty_rate=2000, fill="text") as guest:
        with trio.fail_after(60):
            reports = await run_continuous(guest.control, root, CheckpointSettings(), every=0.15, keep=2, count=4)
        assert [r.image_kind for r in reports] == ["full", "incremental", "incremental", "incremental"]
        assert sorted(os.listdir(root)) == ["000003", "000004"]
        kept = load_chain(os.path.join(root, "000004"))
        assert [image.kind for image in kept] == ["full", "incremental"]
        assert len(kept[0].manifest["merged"]) == 2, "000001 and 000002 were merged into 000003"
        merged = kept[0].manifest
        assert merged["pages"]["unique"] == kept[0].total_pages, "the merged image holds every page once"
        assert merged["bytes_raw"] == merged["pages"]["sent"] * 4096 >= kept[0].total_pages * 4096
        for name in ("000003", "000004"):
            assert (await verify_chain(os.path.join(root, name)))["verified"]
            await _restore_and_check(os.path.join(root, name), sockdir)


@pytest.fixture
async def chain_dir(sockdir, tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    with spawn_guest(os.path.join(sockdir, "src.sock"), size=16 * MiB, dirty_rate=2000, fill="text") as guest:
        with trio.fail_after(60):
            await take_checkpoint(guest.control, str(base / "c1"), RUNNING)
            await trio.sleep(0.2)
            await take_checkpoint(guest.control, str(base / "c2"), RUNNING, parent=str(base / "c1"))
    return base


def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _damage(base, how: str) -> tuple[str, str]:
    """Damage the chain under ``base``; (the file the error must name, a regex it must match)."""
    c2 = read_image(str(base / "c2"))
    if how == "corrupted byte":
        _flip_byte(c2.stream, c2.stream_bytes // 2)
        return c2.stream, r"at byte \d+"
    if how == "truncated":
        os.truncate(c2.stream, c2.stream_bytes - 100)
        return c2.stream, "truncated at offset"
    if how == "missing parent":
        shutil.rmtree(base / "c1")
        return os.path.join(c2.path, "image.json"), "parent image .* is missing"
    if how == "corrupted table":
        _flip_byte(c2.table_path, 8)
        return c2.table_path, "corrupted"
    if how == "older format":    # as an image taken by a migrator of protocol version 1 says
        manifest = os.path.join(c2.path, "image.json")
        with open(manifest, "w") as f:
            json.dump(dict(c2.manifest, format="migrator-image/1"), f)
        return manifest, "image format 'migrator-image/1'; this migrator reads 'migrator-image/2' only"
    raise AssertionError(how)


def _live_guests(control_dir: str) -> list[str]:
    alive = []
    for name in os.listdir(control_dir):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(os.path.join(control_dir, name))
            alive.append(name)
        except OSError:
            pass
        finally:
            s.close()
    return alive


@pytest.mark.parametrize("how", ["corrupted byte", "truncated", "missing parent", "corrupted table", "older format"])
async def test_bad_images_are_refused_and_nothing_resumes(chain_dir, how, sockdir):
    path, pattern = _damage(chain_dir, how)
    control_dir = os.path.join(sockdir, "restore")
    os.mkdir(control_dir)
    with pytest.raises(ImageError, match=pattern) as refused:
        with trio.fail_after(60):
            await restore_chain(str(chain_dir / "c2"), RestoreSettings(control_dir=control_dir), log=lambda line: None)
    assert path in str(refused.value)
    assert _live_guests(control_dir) == [], "a restore guest outlived a refused image"
    with pytest.raises(ImageError, match=pattern):
        await verify_chain(str(chain_dir / "c2"))


async def test_an_image_written_with_a_token_needs_it(sockdir, tmp_path):
    token = b"k" * 32
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 * MiB, dirty_rate=500) as guest:
        with trio.fail_after(60):
            await take_checkpoint(guest.control, str(tmp_path / "m"), CheckpointSettings(leave_running=True, token=token))
    assert (await verify_chain(str(tmp_path / "m"), token=token))["verified"]
    with pytest.raises(ImageError, match="token"):
        await verify_chain(str(tmp_path / "m"))
    with pytest.raises(ImageError, match="different token"):
        await verify_chain(str(tmp_path / "m"), token=b"x" * 32)


async def test_a_replaying_guest_checkpoints_and_its_restore_replays_on(sockdir, tmp_path):
    from harness.traces import sweep_trace
    from migrator.trace.file import write_trace

    trace = tmp_path / "sweep.trace"
    write_trace(trace, sweep_trace(pages=(1024, 512), hot=64, sweep=128, intervals=6, seconds=0.05))
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=None, replay=trace) as guest:
        await trio.sleep(0.2)
        with trio.fail_after(60):
            await take_checkpoint(guest.control, str(tmp_path / "c1"), RUNNING)
        await trio.to_thread.run_sync(_assert_running, guest.control)
    stats = (await _restore_and_check(str(tmp_path / "c1"), sockdir))["guest_stats"]
    assert stats["pattern"] == "replay:sweep.trace" and stats["replay"]["trace"] == "sweep.trace"

