"""Two "hosts" on one machine: network namespaces joined by a veth pair, optionally rate-shaped.

The fault suite and ``scripts/two_hosts.py`` need a real link between a migrator and a receiver
that nobody else uses and that can be shaped (``tc ... tbf``), taken down (``ip link set DEV
down``) and torn down without a trace. ``netem`` is not built into the test kernel, so delay,
jitter and stream faults come from ``faultproxy`` instead.

Names carry this process's pid and a counter, so parallel runs never collide; namespaces whose
creator is dead (a run killed with SIGKILL) are swept by the next ``Testbed``. The /30's
addresses exist only inside the two namespaces: the machine's own routes are never touched.

Needs root: CAP_SYS_ADMIN (``ip netns add``, ``setns``) and CAP_NET_ADMIN (veth, addresses,
``tc``), and iproute2's ``ip`` and ``tc``. ``unavailable()`` says which is missing.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import trio

PREFIX = "mgtb"                 # every namespace this module makes is named mgtb-PID-N-a|b
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000       # <sched.h>; os.CLONE_NEWNET from Python 3.12
IP_TIMEOUT_S = 10.0
_counter = itertools.count()


class TestbedError(Exception):
    """An ``ip``/``tc`` command failed; the message holds the command and its stderr line."""

    __test__ = False   # not a pytest test class


# --- entering a namespace from this process --------------------------------------------------


def _setns_function():
    if hasattr(os, "setns"):
        return lambda fd: os.setns(fd, CLONE_NEWNET)
    libc = ctypes.CDLL(None, use_errno=True)

    def setns(fd: int) -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    return setns


_setns = _setns_function()


@contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the calling thread inside ``netns`` for the block; back in its own one after.

    Only the calling thread moves, and sockets keep the namespace they were created in: create
    them inside the block *without awaiting* (another trio task could run in between and open
    its socket in the wrong namespace), use them anywhere. A child forked inside the block
    starts in ``netns``.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def tcp_socket(netns: str | None) -> socket.socket:
    """A blocking IPv4 TCP socket living in ``netns`` (None: this thread's own namespace)."""
    if netns is None:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with entered(netns):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def connect(host: str, port: int, *, netns: str | None = None, timeout: float = 5.0) -> socket.socket:
    """A connected blocking socket (with ``timeout`` on every call) from inside ``netns``."""
    sock = tcp_socket(netns)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_tcp_stream(host: str, port: int, *, netns: str | None = None) -> trio.SocketStream:
    sock = trio.socket.from_stdlib_socket(tcp_socket(netns))
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def open_tcp_listener(host: str, port: int = 0, *, netns: str | None = None) -> trio.SocketListener:
    """A listener bound to ``host:port`` inside ``netns`` (port 0: any; see ``getsockname``)."""
    sock = tcp_socket(netns)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


# --- the testbed -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One end of the link: its namespace, its veth device, its address in the /30."""

    netns: str
    dev: str
    address: str


@functools.cache
def unavailable() -> str | None:
    """Why a testbed cannot be built here (None: it can). Probed once per process."""
    if os.geteuid() != 0:
        return "network namespaces, veth and tc need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"iproute2's {tool!r} is not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _ip(["ip", "netns", "add", probe])
    except TestbedError as exc:
        return f"'ip netns add' does not work here: {exc}"
    _ip(["ip", "netns", "del", probe], check=False)
    return None


def _ip(argv: Sequence[str], *, check: bool = True) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TestbedError(f"{' '.join(argv)}: no answer within {IP_TIMEOUT_S:g} s") from None
    if check and done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise TestbedError(f"{' '.join(argv)}: {last}")
    return done.stdout


def netns_pids(netns: str) -> list[int]:
    """Processes whose network namespace is ``netns`` (``ip netns pids``)."""
    return [int(p) for p in _ip(["ip", "netns", "pids", netns], check=False).split()]


def sweep_stale() -> list[str]:
    """Delete testbed namespaces whose creating process is gone; returns their names."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    swept = []
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if os.path.exists(f"/proc/{parts[1]}"):
            continue
        _kill_all(netns_pids(name))
        _ip(["ip", "netns", "del", name], check=False)
        swept.append(name)
    return swept


def _kill_all(pids: Sequence[int]) -> None:
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Testbed:
    """Hosts ``a`` (10.x.y.1) and ``b`` (10.x.y.2) joined by a veth pair.

    ``rate`` (tc syntax, e.g. "1gbit", "80mbit") shapes both directions with tbf. Use as a
    context manager, or call ``close()`` in a finally: it kills every process left in the two
    namespaces (all started for this testbed) and deletes them, which removes the veth pair.
    """

    __test__ = False

    def __init__(self, *, rate: str | None = None, subnet: str = "10.201.0") -> None:
        sweep_stale()
        tag = f"{os.getpid()}-{next(_counter)}"
        short = f"{os.getpid():x}{int(tag.rsplit('-', 1)[1]):x}"     # veth names: 15 bytes at most
        self.a = Host(f"{PREFIX}-{tag}-a", f"mg{short}a", f"{subnet}.1")
        self.b = Host(f"{PREFIX}-{tag}-b", f"mg{short}b", f"{subnet}.2")
        self.rate = rate
        self._closed = False
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def host(self, name: str | Host) -> Host:
        if isinstance(name, Host):
            return name
        return {"a": self.a, "b": self.b}[name]

    def _create(self) -> None:
        a, b = self.a, self.b
        for h in (a, b):
            _ip(["ip", "netns", "add", h.netns])
        _ip(["ip", "link", "add", a.dev, "netns", a.netns, "type", "veth", "peer", "name", b.dev, "netns", b.netns])
        for h in (a, b):
            _ip(["ip", "-n", h.netns, "addr", "add", f"{h.address}/30", "dev", h.dev])
            _ip(["ip", "-n", h.netns, "link", "set", "dev", h.dev, "up"])
            _ip(["ip", "-n", h.netns, "link", "set", "dev", "lo", "up"])
        if self.rate is not None:
            self.set_rate(self.rate)

    # --- the link ------------------------------------------------------------------------------

    def set_rate(self, rate: str | None) -> None:
        """Shape both ends with tbf (None: remove the shaping): a 512 KiB burst and 20 ms of
        queue, which carries 0.96 Gbit/s at "1gbit" and stays smooth at tens of Mbit/s."""
        self.rate = rate
        for h in (self.a, self.b):
            _ip(["tc", "-n", h.netns, "qdisc", "del", "dev", h.dev, "root"], check=False)
            if rate is not None:
                _ip(["tc", "-n", h.netns, "qdisc", "add", "dev", h.dev, "root", "tbf", "rate", rate,
                     "burst", "512kb", "latency", "20ms"])

    def set_link(self, up: bool, host: str | Host = "a") -> None:
        """``ip link set DEV up|down`` on one end: a cable pulled (no RST, no FIN: silence)."""
        h = self.host(host)
        _ip(["ip", "-n", h.netns, "link", "set", "dev", h.dev, "up" if up else "down"])

    def tx_bytes(self, host: str | Host = "a") -> int:
        """Bytes sent so far by ``host``'s veth end (to time a fault "mid-round")."""
        h = self.host(host)
        info = json.loads(_ip(["ip", "-n", h.netns, "-j", "-s", "link", "show", "dev", h.dev]))
        return int(info[0]["stats64"]["tx"]["bytes"])

    # --- processes -----------------------------------------------------------------------------

    def argv(self, host: str | Host, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside ``host``'s namespace (``ip netns exec`` execs it, so
        the child's pid is the command's own)."""
        return ["ip", "netns", "exec", self.host(host).netns, *argv]

    def popen(self, host: str | Host, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(host, argv), **kwargs)

    async def open_process(self, host: str | Host, argv: Sequence[str], **kwargs) -> trio.Process:
        return await trio.lowlevel.open_process(self.argv(host, argv), **kwargs)

    def pids(self) -> list[int]:
        return [pid for h in (self.a, self.b) for pid in netns_pids(h.netns)]

    # --- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what still runs in the namespaces, delete them (and with them the veth pair).
        Idempotent; safe after a partial set-up."""
        if self._closed:
            return
        self._closed = True
        for h in (self.a, self.b):
            if os.path.exists(os.path.join(NETNS_DIR, h.netns)):
                _kill_all(netns_pids(h.netns))
                _ip(["ip", "netns", "del", h.netns], check=False)
