"""Output files (``migrator.core.files``): a new file renamed over the target, never through a link."""

from __future__ import annotations

import json
import os
import stat

import pytest

from migrator.checkpoint.image import PendingImage
from migrator.core.errors import ImageError, OutputError
from migrator.core.files import check_output, open_log, open_output, write_file, write_json


@pytest.fixture
def victim(tmp_path):
    """A file somebody else owns and cares about: what a planted link points at."""
    path = tmp_path / "elsewhere" / "precious"
    path.parent.mkdir()
    path.write_bytes(b"keep me")
    return path


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_writes_and_replaces_a_file_leaving_no_temporary_behind(tmp_path):
    target = tmp_path / "run.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    write_file(target, "second", durable=True)
    assert target.read_text() == "second"
    assert _leftovers(tmp_path) == []


def test_new_files_get_the_umask_mode_as_open_would(tmp_path):
    old = os.umask(0o027)
    try:
        write_file(tmp_path / "r.json", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o640


def test_a_link_at_the_target_is_refused_and_nothing_is_written_through_it(tmp_path, victim):
    link = tmp_path / "run.json"
    link.symlink_to(victim)
    with pytest.raises(OutputError, match="is a symbolic link; refusing to write through it"):
        write_file(link, b"overwritten")
    with pytest.raises(OutputError, match="symbolic link"):
        check_output(link)
    assert victim.read_bytes() == b"keep me" and link.is_symlink()
    dangling = tmp_path / "new.json"                  # a link to a file that does not exist yet
    dangling.symlink_to(victim.parent / "created")
    with pytest.raises(OutputError, match="symbolic link"):
        write_file(dangling, b"x")
    assert not (victim.parent / "created").exists()
    assert _leftovers(tmp_path) == []


def test_a_link_planted_after_the_check_is_replaced_not_followed(tmp_path, victim):
    target = tmp_path / "plot.png"
    with open_output(target) as f:
        f.write(b"the plot")
        target.symlink_to(victim)          # the race: planted between the check and the rename
    assert not target.is_symlink() and target.read_bytes() == b"the plot"
    assert victim.read_bytes() == b"keep me"


@pytest.mark.parametrize("case", ["missing directory", "directory is a file", "target is a directory", "a fifo"])
def test_paths_that_cannot_be_written_are_refused_in_one_line(tmp_path, case):
    if case == "missing directory":
        path, message = tmp_path / "nope" / "r.json", "directory .*nope does not exist"
    elif case == "directory is a file":
        (tmp_path / "file").write_text("")
        path, message = tmp_path / "file" / "r.json", "does not exist|is not a directory"
    elif case == "target is a directory":
        path, message = tmp_path, "is a directory"
    else:
        path, message = tmp_path / "fifo", "not a regular file"
        os.mkfifo(path)
    with pytest.raises(OutputError, match=message) as failure:
        write_file(path, b"x")
    assert "\n" not in str(failure.value)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with open_output(target, "w") as f:
            f.write("half")
            raise RuntimeError("the writer failed")
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_a_log_is_opened_in_place_never_through_a_link(tmp_path, victim):
    with open_log(tmp_path / "receiver.log") as f:
        f.write(b"line\n")
    assert (tmp_path / "receiver.log").read_bytes() == b"line\n"
    (tmp_path / "link.log").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        open_log(tmp_path / "link.log")
    assert victim.read_bytes() == b"keep me"


def test_an_image_is_never_renamed_onto_a_link(tmp_path, victim):
    link = tmp_path / "image"
    link.symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(ImageError, match="already exists"):
        PendingImage(str(link))
    link.unlink()
    pending = PendingImage(str(link))
    (tmp_path / "image").symlink_to(victim.parent, target_is_directory=True)   # appears mid-checkpoint
    with pytest.raises(ImageError, match="appeared while the checkpoint was written"):
        pending.commit()
    pending.discard()
    assert sorted(os.listdir(victim.parent)) == ["precious"] and os.listdir(tmp_path) == ["elsewhere", "image"]
