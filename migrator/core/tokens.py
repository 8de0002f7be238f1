"""Token files: where a receiver keeps its token by default, and reading token files safely.

Authentication is on by default, loopback included: without a token any local user who can
connect could make a receiver start a restore guest as large as it accepts and fill it. So
``migrator receive`` without ``--token-file`` uses the token in ``default_token_path()``,
creating one (``secrets``) the first time, and ``migrator migrate`` run by the same user on the
same host reads the same file. A source on another host needs a copy of it (``--token-file``).

Where: ``$XDG_RUNTIME_DIR/migrator/token`` when the session has a runtime directory (a per-user
tmpfs, mode 0700, cleared at logout: a new token then), else
``${XDG_STATE_HOME:-~/.local/state}/migrator/token``. The ``migrator`` directory is made with
mode 0700 and must stay private to its owner; the file is 0600, created exclusively (a
temporary file of ours linked into place, so a concurrent reader never sees it half-written)
and never opened through a symbolic link. Once made it is reused by every later receiver of the
user, as an ssh key is: receivers running side by side, and sources given a copy once, agree.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Mapping

from .errors import TransportError

MIN_TOKEN = 16               # bytes; the protocol refuses shorter secrets
TOKEN_HEX_BYTES = 32         # a new token: 32 random bytes, written as 64 hex digits
READ_LIMIT = 64 << 10        # what is read of a token file, at most
_PRIVATE = 0o077             # permission bits that must be clear on the directory and the file


def default_token_path(env: Mapping[str, str] | None = None) -> str:
    """Where this user's receivers and sources keep their token (see the module docstring)."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and os.path.isdir(runtime):
        return os.path.join(runtime, "migrator", "token")
    state = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "migrator", "token")


def read_token_file(path: str, *, private: bool = False) -> bytes:
    """The secret in ``path``, surrounding white space dropped. ``private`` (the default token
    file) also requires a regular file of this user that nobody else may read, reached without
    a symbolic link. Raises TransportError with one line naming what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if private else 0))
    except OSError as exc:
        if private and exc.errno == errno.ELOOP:
            raise TransportError(f"token file {path} is a symbolic link: remove it (a receiver then writes a new one)") from None
        raise TransportError(f"cannot read token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if private:
            _check_private(os.fstat(fd), path, "file")
        try:
            token = f.read(READ_LIMIT).strip()
        except OSError as exc:
            raise TransportError(f"cannot read token file {path}: {exc.strerror}") from None
    if len(token) < MIN_TOKEN:
        raise TransportError(f"token file {path} holds {len(token)} bytes; use at least {MIN_TOKEN}")
    return token


def ensure_default_token(path: str | None = None) -> tuple[str, bytes, bool]:
    """(path, token, created): the default token, made now if there is none yet."""
    path = path or default_token_path()
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _check_private(os.lstat(directory), directory, "directory")
    except OSError as exc:
        raise TransportError(f"cannot make the token directory {directory}: {exc.strerror}") from None
    if not os.path.lexists(path):
        created = _create(path)
        if created is not None:
            return path, created, True
    return path, read_token_file(path, private=True), False


def load_default_token(path: str | None = None) -> bytes:
    """The default token, which a receiver of this user on this host wrote; one line saying
    what to do when there is none."""
    path = path or default_token_path()
    if not os.path.lexists(path):
        raise TransportError(
            f"no token at {path}: `migrator receive` run by this user on this host writes it; for a receiver "
            "on another host copy its token here or pass --token-file (or --insecure on both ends, loopback only)"
        )
    return read_token_file(path, private=True)


def _create(path: str) -> bytes | None:
    """Write a new token to a private temporary file and link it to ``path``; None if another
    process made ``path`` first (its token wins)."""
    token = secrets.token_hex(TOKEN_HEX_BYTES).encode()
    temp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.new"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(token + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.link(temp, path, follow_symlinks=False)
        finally:
            os.unlink(temp)
    except FileExistsError:
        return None
    except OSError as exc:
        raise TransportError(f"cannot write token file {path}: {exc.strerror}") from None
    return token


def _check_private(st: os.stat_result, path: str, kind: str) -> None:
    want = stat.S_ISDIR if kind == "directory" else stat.S_ISREG
    if not want(st.st_mode):
        raise TransportError(f"token {kind} {path} is not a {kind} (a link or something else): remove it")
    if st.st_uid != os.geteuid():
        raise TransportError(f"token {kind} {path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
    if st.st_mode & _PRIVATE:
        mode = "700" if kind == "directory" else "600"
        raise TransportError(f"token {kind} {path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}): "
                             f"chmod {mode} it")
