"""Writing an output file without ever following a link: a new file beside it, then a rename.

Every file migrator writes (reports, plots, experiment results and summaries, checkpoint
manifests, a receiver's log) goes through here, because outputs often land in shared
directories such as /tmp, where another user can plant a symbolic link at the path first.
Opening that path for writing would follow the link and overwrite, or create, whatever it names
with our rights (often root's). So:

- the bytes go to a file created exclusively (``O_CREAT|O_EXCL|O_NOFOLLOW``: never through a
  link, never an existing file) under a temporary name in the target's own directory, which is
  held open by descriptor, so the temporary file and the final name are in the same directory
  even if the path to it is swapped meanwhile;
- that file is renamed over the target: a rename replaces a link itself, never what it points
  to, and a reader never sees half a file;
- a link already at the target is refused rather than replaced: the path is not what the user
  thinks, and one line saying so beats a silent surprise. (A link planted between that check
  and the rename is replaced, harmlessly.)

``check_output`` makes the same checks alone, so that a command refuses a bad ``--report``
before its migration starts rather than after it. Files are created with mode 0666 less the
umask, as ``open`` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from typing import IO, Any

from .errors import OutputError

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_KEPT = 200          # of the target's name in the temporary one (NAME_MAX is 255)


def check_output(path: str | os.PathLike) -> tuple[str, str]:
    """(directory, name) of an output path we may write; OutputError with one line otherwise:
    the target is a symbolic link, a directory or not a regular file, or its directory is
    missing, not a directory, or not writable."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    directory = directory or "."
    if name in ("", ".", ".."):
        raise OutputError(f"{path}: names a directory, not a file")
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None                 # the directory check below says what is wrong, if anything
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror}") from None
    if mode is not None:
        if stat.S_ISLNK(mode):
            raise OutputError(f"{path}: is a symbolic link; refusing to write through it")
        if stat.S_ISDIR(mode):
            raise OutputError(f"{path}: is a directory")
        if not stat.S_ISREG(mode):
            raise OutputError(f"{path}: is not a regular file")
    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            raise OutputError(f"{path}: {directory} is not a directory")
    except (FileNotFoundError, NotADirectoryError):
        raise OutputError(f"{path}: directory {directory} does not exist") from None
    except OSError as exc:
        raise OutputError(f"{path}: directory {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: directory {directory} is not writable")
    return directory, name


@contextlib.contextmanager
def _as_output_error(path: str) -> Iterator[None]:
    """An OSError in the block becomes OutputError naming ``path`` (one line for the user)."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _directory(directory: str, path: str) -> Iterator[int]:
    """The target's directory, held open for the ``*at`` calls."""
    with _as_output_error(path):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield dir_fd
    finally:
        os.close(dir_fd)


def _create_temporary(dir_fd: int, name: str) -> tuple[int, str]:
    """A new file beside ``name`` in the directory ``dir_fd``: (fd, its name)."""
    for _ in range(100):
        temp = f".{name[:_NAME_KEPT]}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(temp, _CREATE, 0o666, dir_fd=dir_fd), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {name}")


@contextlib.contextmanager
def open_output(path: str | os.PathLike, mode: str = "wb", *, durable: bool = False) -> Iterator[IO[Any]]:
    """A file object (``mode`` "wb" or "w") whose contents become ``path`` when the block ends
    without an exception; on one, the temporary file goes and ``path`` is left as it was.
    ``durable`` fsyncs the file and then the directory, so the new contents survive a crash."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_output writes ('w' or 'wb'), not {mode!r}")
    directory, name = check_output(path)
    path = os.fspath(path)
    text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    with _directory(directory, path) as dir_fd, _as_output_error(path):
        fd, temp = _create_temporary(dir_fd, name)
        try:
            with os.fdopen(fd, mode, **text) as f:
                yield f
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        if durable:
            os.fsync(dir_fd)


def write_file(path: str | os.PathLike, data: bytes | str, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8), never through a link."""
    with open_output(path, "wb", durable=durable) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json(path: str | os.PathLike, value: object, *, durable: bool = False, **options: Any) -> None:
    """Replace ``path`` with ``value`` as JSON (``options`` go to ``json.dumps``), never through a link."""
    write_file(path, json.dumps(value, **options), durable=durable)


def open_log(path: str | os.PathLike) -> IO[bytes]:
    """A new, empty file at ``path`` for writing as it goes (a child process's log): created
    like the others under a temporary name and renamed into place at once, so it too never
    follows a link. The caller closes it."""
    directory, name = check_output(path)
    path = os.fspath(path)
    with _directory(directory, path) as dir_fd, _as_output_error(path):
        fd, temp = _create_temporary(dir_fd, name)
        try:
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
    return os.fdopen(fd, "w+b")
