"""The guest process: its region, writer thread, uffd and control socket, until ``quit``.

One thread per control connection: requests on one connection are answered in order, and a
request that waits (``pause`` with ``at_step``) does not hold up the others. Control requests
never run Python per page; digest and check hold the writer at a step boundary while they read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import GuestError, MigratorError
from ..core.model import PAGE_SIZE
from ..tracker.handover import send_fds
from . import committed
from .layout import Settings
from .mapping import RegionMapping
from .control import LineBuffer, Request, decode_pages, error_reply, ok_reply, parse_request
from .runner import RESTORING, WorkloadRunner
from .tracking import GuestTracking
from .workload import Workload

ACCEPT_POLL = 0.2        # seconds between checks for quit / orphaning while idle
MAX_CONNECTIONS = 64
# discard waits this long for the background populate: it would fault the dropped pages back in
POPULATE_WAIT = 60.0
DISCARD_REFUSAL = "discard: only a restore guest that has not resumed may drop pages"


@dataclass(frozen=True, slots=True)
class GuestConfig:
    size: int
    control: str
    settings: Settings = Settings()
    memfd: bool = False
    restore: bool = False
    paused: bool = False          # wait for resume before the first step
    exit_with_parent: bool = False


class GuestServer:
    """Answers control requests for one guest (see docs/guest-protocol.md)."""

    def __init__(self, config: GuestConfig) -> None:
        self.config = config
        self.mapping = RegionMapping(config.size, memfd=config.memfd)
        if config.restore:
            self.mapping.populate_in_background()
            workload = Workload(self.mapping)
        else:
            workload = Workload.create(self.mapping, config.settings)
        self.tracking = GuestTracking([self.mapping.region])
        self.runner = WorkloadRunner(workload, restoring=config.restore)
        self._stop = threading.Event()
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._handlers: dict[str, Callable[..., tuple[dict, list[int]]]] = {
            "attach": self._attach,
            "stats": self._stats,
            "digest": self._digest,
            "check": self._check,
            "discard": self._discard,
            "pause": self._pause,
            "resume": self._resume,
            "set-tag": self._set_tag,
            "quit": self._quit,
        }

    # --- request handlers: (reply fields, fds to send) ----------------------------------------------

    def _attach(self, owner: object, tracker: str = "wp-async"):
        uffd = self.tracking.attach(tracker, owner)
        fds = [fd for fd in (uffd, self.mapping.memfd) if fd is not None]
        region = self.mapping.region
        stats = self.runner.statistics()
        return {
            "pid": os.getpid(),
            "page_size": PAGE_SIZE,
            "regions": [{"start": region.start, "length": region.length}],
            "uffd": uffd is not None,
            "memfd": self.mapping.memfd is not None,
            "restore": stats.state == RESTORING,
            "steps": stats.steps,
        }, fds

    def _stats(self, owner: object):
        stats = self.runner.statistics()
        workload = self.runner.workload
        valid = workload.control_problem() is None
        reply = {"steps": stats.steps, "write_rate": round(stats.write_rate, 1), "state": stats.state,
                 "tag": workload.tag if valid else None, "pid": os.getpid()}
        if self.mapping.populated is not None:
            reply["populated"] = self.mapping.populated
        if valid:
            reply.update(workload.describe())
            if workload.replaying:
                reply["replay"] = workload.replay_position()
        return reply, []

    def _digest(self, owner: object):
        with self.runner.exclusive() as workload:
            return {"digest": workload.digest(), "steps": workload.steps}, []

    def _check(self, owner: object, deep: bool | None = None, pages: str | None = None):
        runs = None if pages is None else decode_pages(pages)
        with self.runner.exclusive() as workload:
            if runs is None:
                result = workload.check(deep=deep is not False)
            else:
                result = workload.check_pages(runs, deep=deep is not False)
            steps = workload.steps
        return {**dataclasses.asdict(result), "steps": steps}, []

    def _discard(self, owner: object, pages: str):
        runs = decode_pages(pages, "discard")
        if self.mapping.memfd is not None:
            raise GuestError("discard: a memfd guest's pages stay in its memfd; only private memory can be dropped")
        self.runner.while_restoring(lambda _: None, DISCARD_REFUSAL)    # refuse before waiting
        if not self.mapping.wait_populated(POPULATE_WAIT):
            raise GuestError(f"discard: the region is still being populated after {POPULATE_WAIT:g} s")
        dropped, advised = self.runner.while_restoring(lambda workload: workload.discard(runs), DISCARD_REFUSAL)
        return {"pages": dropped, "runs": advised}, []

    def _pause(self, owner: object, at_step: int | None = None):
        return {"steps": self.runner.pause(at_step)}, []

    def _resume(self, owner: object, until_step: int | None = None):
        refusal = committed.refusal(self.config.control, os.getpid(), "resume")
        if refusal:
            raise GuestError(refusal)
        self.runner.resume(until_step)
        return {}, []

    def _set_tag(self, owner: object, tag: str):
        with self.runner.exclusive() as workload:
            problem = workload.control_problem()
            if problem:
                raise GuestError(f"cannot set a tag: {problem}")
            workload.set_tag(tag)
        return {}, []

    def _quit(self, owner: object):
        return {}, []   # the connection calls stop() once this reply is sent

    def handle(self, request: Request, owner: object) -> tuple[bytes, list[int]]:
        try:
            fields, fds = self._handlers[request.cmd](owner, **request.args)
            return ok_reply(**fields), fds
        except (MigratorError, OSError) as exc:
            return error_reply(str(exc)), []
        except Exception as exc:  # a bug: report it and keep serving
            traceback.print_exc(file=sys.stderr)
            return error_reply(f"internal error: {type(exc).__name__}: {exc}"), []

    # --- connections ---------------------------------------------------------------------------------

    def _serve_connection(self, conn: socket.socket) -> None:
        lines = LineBuffer()
        owner = object()   # identifies this connection to the tracking (sync-wp ownership)
        try:
            while not self._stop.is_set():
                data = conn.recv(65536)
                if not data:
                    break
                try:
                    requests = lines.feed(data)
                except GuestError as exc:
                    conn.sendall(error_reply(str(exc)))
                    break   # cannot find the next line boundary: drop the connection
                for line in requests:
                    try:
                        request = parse_request(line)
                    except GuestError as exc:
                        conn.sendall(error_reply(str(exc)))
                        continue
                    reply, fds = self.handle(request, owner)
                    if fds:
                        send_fds(conn, reply, fds)
                    else:
                        conn.sendall(reply)
                    if request.cmd == "quit":
                        self.stop()   # only now: the reply must leave before the process exits
        except OSError:
            pass   # the peer vanished mid-reply: same as closing
        finally:
            self.tracking.detach(owner)
            conn.close()
            self._connections.release()

    def serve(self, listener: socket.socket) -> None:
        """Accept connections until ``quit``, or the parent exits (with exit_with_parent, or
        while still restoring: a restore guest whose receiver died will never be resumed)."""
        parent = os.getppid()
        listener.settimeout(ACCEPT_POLL)
        while not self._stop.is_set():
            orphaned = os.getppid() != parent
            if orphaned and self.config.exit_with_parent:
                break
            if orphaned and self.runner.statistics().state == RESTORING:
                break  # the receiver died before resuming us: this half-copied guest is garbage
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            if not self._connections.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    conn.sendall(error_reply(f"too many control connections (max {MAX_CONNECTIONS})"))
                conn.close()
                continue
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                             name="guest-control").start()

    def stop(self) -> None:
        """Make ``serve`` return (quit, SIGTERM)."""
        self._stop.set()

    def close(self) -> None:
        self.runner.stop()


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket file at ``path``; refuse if a live guest answers there."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        committed.discard_stale(path)   # a committed guest's record outlives it only if killed
        return
    except OSError as exc:
        raise GuestError(f"control socket path {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    raise GuestError(f"control socket {path} is in use by another process")


def _stop_again_if_committed(control: str) -> None:
    """SIGCONT woke a guest whose state file says a migration committed it: the copy at the
    destination is the live one, so stop again (the writer ran for the moment this took)."""
    refusal = committed.refusal(control, os.getpid(), "run")
    if refusal:
        print(f"migrator guest: {refusal}; stopping again", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)


def run_guest(config: GuestConfig) -> int:
    """Run a guest until ``quit`` or SIGTERM; returns the exit code."""
    _claim_socket_path(config.control)
    server = GuestServer(config)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(config.control)
    except OSError as exc:
        raise GuestError(f"cannot listen on {config.control}: {exc.strerror}") from exc
    previous = signal.signal(signal.SIGTERM, lambda *_: server.stop())
    previous_cont = signal.signal(signal.SIGCONT, lambda *_: _stop_again_if_committed(config.control))
    try:
        os.chmod(config.control, 0o600)
        listener.listen(16)
        if not (config.restore or config.paused):
            server.runner.resume()
        region = server.mapping.region
        mode = server.runner.statistics().state
        print(f"migrator guest: pid {os.getpid()}, {region.length >> 20} MiB at {region.start:#x}, {mode}, "
              f"control {config.control}", file=sys.stderr, flush=True)
        plan = config.settings.replay
        if plan is not None and not config.restore:
            print(f"migrator guest: replaying {plan.name}: {plan.steps} page writes in {len(plan.intervals)} "
                  f"intervals over {plan.seconds:.3g} s, looping", file=sys.stderr, flush=True)
        if server.tracking.unavailable:
            print(f"migrator guest: no write-protect tracking: {server.tracking.unavailable}",
                  file=sys.stderr, flush=True)
        server.serve(listener)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGCONT, previous_cont)
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.control)
        server.close()
    return 0
