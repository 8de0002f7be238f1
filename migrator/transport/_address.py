"""Addresses: ``HOST:PORT``, ``tcp:HOST:PORT``, ``[IPv6]:PORT``, ``unix:/path``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..core.errors import TransportError


@dataclass(frozen=True, slots=True)
class Address:
    kind: str          # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Only this machine can reach it (unix sockets also obey their file permissions)."""
        if self.kind == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False   # a host name: it might resolve to anything


def parse_address(text: str) -> Address:
    if not isinstance(text, str) or not text:
        raise TransportError(f"bad address {text!r}: expected HOST:PORT, tcp:HOST:PORT or unix:PATH")
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise TransportError(f"bad address {text!r}: unix: needs a path")
        return Address("unix", path=path)
    rest = text[len("tcp:"):] if text.startswith("tcp:") else text
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise TransportError(f"bad address {text!r}: expected HOST:PORT, tcp:HOST:PORT or unix:PATH")
    return Address("tcp", host=host, port=int(port))
