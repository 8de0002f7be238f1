"""The control socket of a running command: ``migrator status``, ``cancel`` and ``set`` from
another terminal (QEMU's ``query-migrate``, ``migrate_cancel``, ``migrate-set-parameters``).

A unix stream socket in a directory only its user can enter (``control_dir``:
``$XDG_RUNTIME_DIR/migrator``, else ``/tmp/migrator-UID``, made 0700 and refused if it is a link,
someone else's, or open to others). One request per connection: one JSON line in, one JSON line
out. Every request byte is hostile: at most ``MAX_REQUEST`` bytes, a deadline, the peer's uid
checked (``SO_PEERCRED``: ours or root), the line parsed as JSON (never pickle or eval) and then
type-checked into a ``Request``; anything else gets ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import json
import os
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import trio

from ..core.documents import convert
from ..core.errors import MigratorError, TransportError

MAX_REQUEST = 4096          # bytes of one request line
REQUEST_TIMEOUT_S = 2.0     # to send a request, and to answer it
SUFFIX = ".sock"

Handler = Callable[["Request"], dict]


@dataclass(frozen=True, slots=True)
class Request:
    """What a client asks: ``status``; ``cancel``; ``set`` some of the parameters (None: unchanged)."""

    op: Literal["status", "cancel", "set"]
    bandwidth: float | Literal["unlimited"] | None = None   # bytes/s
    downtime_ms: float | None = None
    max_rounds: int | None = None


def control_dir() -> str:
    """The user's directory for control sockets, made if missing; TransportError if it is not
    safe (a link, another user's, open to others)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime if runtime and os.path.isabs(runtime) and os.path.isdir(runtime) else None
    # not $TMPDIR: a client in another shell must find the same directory
    path = os.path.join(base, "migrator") if base else f"/tmp/migrator-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise TransportError(f"{path}: not a directory (a link?); refusing to put control sockets there")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise TransportError(f"{path}: must be a 0700 directory of uid {os.getuid()}; refusing to use it")
    return path


def control_path(name: str) -> str:
    return os.path.join(control_dir(), name + SUFFIX)


async def serve_control(path: str, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer requests on a new socket at ``path`` until cancelled, then remove it."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
    except OSError as exc:
        sock.close()
        raise TransportError(f"control socket {path}: {exc.strerror}") from None
    try:
        sock.listen(8)
        task_status.started(path)
        await trio.serve_listeners(functools.partial(_answer, handler), [trio.SocketListener(sock)])
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _answer(handler: Handler, stream: trio.SocketStream) -> None:
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            try:
                reply = {"ok": True, **handler(await _read_request(stream))}
            except MigratorError as exc:
                reply = {"ok": False, "error": str(exc)}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _read_request(stream: trio.SocketStream) -> Request:
    uid = struct.unpack("3i", stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
    if uid not in (os.getuid(), 0):
        raise MigratorError(f"uid {uid} may not control this migration")
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(MAX_REQUEST + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise MigratorError(f"a request is one JSON line of at most {MAX_REQUEST} bytes")
    try:
        parsed = json.loads(data.split(b"\n", 1)[0])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MigratorError("a request is one JSON object on one line") from None
    return convert(Request, parsed)


# --- the client ------------------------------------------------------------------------------------


def request(path: str, req: dict, *, timeout: float = REQUEST_TIMEOUT_S) -> dict:
    """Send ``req`` to the control socket at ``path``; its answer. TransportError when nobody
    answers there, MigratorError carrying the endpoint's refusal."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) < 1 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise TransportError(f"{path}: {exc.strerror or 'timed out'}") from None
    try:
        reply = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TransportError(f"{path}: the answer is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise TransportError(f"{path}: the answer is not a control reply")
    if not reply["ok"]:
        raise MigratorError(str(reply.get("error")))
    return reply


def running(directory: str | None = None) -> list[str]:
    """The control sockets in ``directory`` (default ``control_dir()``) that answer; stale ones
    (nobody listening: a command killed with SIGKILL) are removed."""
    live = []
    for path in sorted(glob.glob(os.path.join(directory or control_dir(), "*" + SUFFIX))):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(REQUEST_TIMEOUT_S)
            try:
                sock.connect(path)
                live.append(path)
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
    return live


def find_one(directory: str | None = None, kinds: tuple[str, ...] = ("migrate", "receive")) -> str:
    """The one running command's control socket, a ``migrate`` before a ``receive`` (both run on
    one host when migrating by hand); MigratorError when there is none, or several of a kind."""
    live = running(directory)
    for kind in kinds:
        found = [path for path in live if os.path.basename(path).startswith(kind + "-")]
        if len(found) == 1:
            return found[0]
        if found:
            raise MigratorError(f"{len(found)} running {kind}s: name one with --control ({', '.join(found)})")
    where = directory or control_dir()
    raise MigratorError(f"no running {' or '.join(kinds)} of this user (no control socket answers in {where})")
