"""The checkpoint, restore and inspect commands, each a separate process as a user runs them: the
guest's tracker stays armed between invocations, and inspect reports what the images hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.tracker.features import wp_async_missing

from checkpoint_helpers import MiB

pytestmark = pytest.mark.skipif(wp_async_missing() is not None, reason=f"needs userfaultfd WP_ASYNC: {wp_async_missing()}")


def migrator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True, timeout=60)


def test_checkpoint_incremental_inspect_restore_commands(sockdir, tmp_path):
    d1, d2, d3 = (str(tmp_path / n) for n in ("d1", "d2", "d3"))
    with spawn_guest(os.path.join(sockdir, "g.sock"), size=16 * MiB, dirty_rate=1000, fill="text") as guest:
        first = migrator("checkpoint", "--guest", guest.control, "--dir", d1, "--leave-running")
        assert first.returncode == 0, first.stderr
        assert "full image" in first.stdout and "frozen" in first.stdout
        second = migrator("checkpoint", "--guest", guest.control, "--dir", d2, "--parent", d1, "--leave-running")
        assert second.returncode == 0, second.stderr
        assert "incremental image" in second.stdout

        stale = migrator("checkpoint", "--guest", guest.control, "--dir", d3, "--parent", d1)
        assert stale.returncode == 1 and not os.path.exists(d3)
        assert stale.stderr.count("\n") == 1 and "ImageError: refusing an incremental image" in stale.stderr
        assert guest.alive()

        info = migrator("inspect", d2, "--json")
        assert info.returncode == 0, info.stderr
        doc = json.loads(info.stdout)
        assert [image["kind"] for image in doc["chain"]] == ["full", "incremental"]
        assert doc["layout"]["bytes"] == 16 * MiB and doc["layout"]["page_size"] == 4096
        for image in doc["chain"]:
            assert image["frozen_ms"] > 0 and image["bytes_stored"] > 0 and image["ratio"] > 1  # text compresses
            assert image["pages"]["unique"] > 0 and len(image["digest"]) == 32
        assert doc["chain"][1]["pages"]["unique"] < doc["chain"][0]["pages"]["unique"]
        text = migrator("inspect", d2, "--verify")
        assert text.returncode == 0, text.stderr
        assert "chain: 2 image(s)" in text.stdout and "incremental" in text.stdout and "OK" in text.stdout

        last = migrator("checkpoint", "--guest", guest.control, "--dir", d3, "--parent", d2)
        assert last.returncode == 0, last.stderr
        guest.popen.wait(10)        # without --leave-running the guest is gone once its image is safe

    control_dir = os.path.join(sockdir, "restored")
    restored = migrator("restore", "--dir", d3, "--control-dir", control_dir)
    assert restored.returncode == 0, restored.stderr
    assert "digests and self-check OK" in restored.stdout
    (name,) = os.listdir(control_dir)
    with GuestClient(os.path.join(control_dir, name)) as client:
        assert client.stats()["state"] == "running"
        client.quit()


def test_an_image_of_an_older_format_is_refused_in_one_line(tmp_path):
    image = tmp_path / "old"
    image.mkdir()
    (image / "image.json").write_text(json.dumps({"format": "migrator-image/1", "id": "x", "kind": "full"}))
    for command in (["inspect", str(image)], ["restore", "--dir", str(image)]):
        result = migrator(*command)
        assert result.returncode == 1
        assert result.stderr.strip() == (f"migrator: ImageError: {image / 'image.json'}: image format 'migrator-image/1'; "
                                         "this migrator reads 'migrator-image/2' only (the image was taken by another "
                                         "migrator version: restore it with that one)")


def test_inspect_names_a_missing_image(tmp_path):
    result = migrator("inspect", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"migrator: ImageError: {tmp_path / 'nothing' / 'image.json'}: no such file: {tmp_path / 'nothing'} is not a complete image"
