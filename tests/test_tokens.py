"""The default token file: where it lives, made private and exclusively, never read through a
link or when others may read it; every refusal one line."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from migrator.core.errors import TransportError
from migrator.core.tokens import (
    default_token_path, ensure_default_token, load_default_token, read_token_file,
)


def test_default_path_prefers_the_runtime_dir_then_the_state_dir(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    assert default_token_path({"XDG_RUNTIME_DIR": str(runtime)}) == str(runtime / "migrator" / "token")
    state = str(tmp_path / "state")
    assert default_token_path({"XDG_RUNTIME_DIR": str(tmp_path / "missing"), "XDG_STATE_HOME": state}) == \
        os.path.join(state, "migrator", "token")
    home = os.path.expanduser("~")
    assert default_token_path({"XDG_RUNTIME_DIR": "relative", "XDG_STATE_HOME": "relative"}) == \
        os.path.join(home, ".local", "state", "migrator", "token")


def test_made_once_private_then_reused(private_runtime_dir):
    path, token, created = ensure_default_token()
    assert path == str(private_runtime_dir / "migrator" / "token") and created and len(token) == 64
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(os.path.dirname(path)).st_mode) == 0o700
    assert ensure_default_token() == (path, token, False)
    assert load_default_token() == token
    assert os.listdir(os.path.dirname(path)) == ["token"], "no temporary file is left behind"


def _make(queue) -> None:
    queue.put(ensure_default_token()[1])


def test_receivers_starting_together_agree_on_one_token(private_runtime_dir):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_make, args=(queue,)) for _ in range(4)]
    for worker in workers:
        worker.start()
    tokens = {queue.get(timeout=60) for _ in workers}
    for worker in workers:
        worker.join(timeout=60)
    assert tokens == {load_default_token()}


def test_a_link_in_place_of_the_token_is_refused(private_runtime_dir, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("a" * 64)
    target.chmod(0o600)
    directory = private_runtime_dir / "migrator"
    directory.mkdir(mode=0o700)
    (directory / "token").symlink_to(target)
    for call in (ensure_default_token, load_default_token):
        with pytest.raises(TransportError, match="is a symbolic link"):
            call()
    os.unlink(directory / "token")
    dangling = directory / "token"
    dangling.symlink_to(tmp_path / "not-yet")
    with pytest.raises(TransportError, match="is a symbolic link"):
        ensure_default_token()
    assert not (tmp_path / "not-yet").exists(), "never created through a link"


def test_a_token_others_may_read_is_refused(private_runtime_dir):
    path, _, _ = ensure_default_token()
    os.chmod(path, 0o644)
    with pytest.raises(TransportError, match=r"open to other users \(mode 644\): chmod 600"):
        load_default_token()
    os.chmod(path, 0o600)
    os.chmod(os.path.dirname(path), 0o755)
    with pytest.raises(TransportError, match=r"token directory .* open to other users \(mode 755\): chmod 700"):
        ensure_default_token()


def test_missing_or_short_token_files_say_so():
    with pytest.raises(TransportError, match="no token at .*migrator receive.*--token-file"):
        load_default_token()
    with pytest.raises(TransportError, match="cannot read token file /nonexistent/t: No such file"):
        read_token_file("/nonexistent/t")


def test_a_short_token_is_refused(tmp_path):
    short = tmp_path / "t"
    short.write_text("short\n")
    with pytest.raises(TransportError, match="holds 5 bytes; use at least 16"):
        read_token_file(str(short))
