"""Challenge-response over a pre-shared token, and the session keys it yields (pure functions).

::

    source -> dest   Hello(nonce_s)                              checksummed
    dest -> source   Hello(nonce_d, session id, proof_d)         checksummed
    source -> dest   Auth(proof_s)                               checksummed
    ... every later frame in both directions carries HMACs under the session keys

``th`` = SHA-256 over the canonical bytes of both Hellos (proof excluded), so the proofs also bind
versions, features and stream counts: a man in the middle can neither forge nor downgrade them.
``proof_d`` = HMAC(token, "dest proof" | th) and ``proof_s`` = HMAC(token, "source proof" | th)
are domain-separated, so neither side's proof can be reflected back as the other's. The session
secret is HMAC(token, "session" | th): fresh for every connection because both nonces are, so a
recorded stream replayed into a new connection fails its first MAC. A parallel stream joins with
the same exchange, keyed by the primary connection's secret instead of the token. A recorded
stream (checkpoint image) has only the source's Hello: its proof and keys use that one Hello.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import msgpack

from ._frames import Mac
from .events import Hello

_LABEL = b"migrator/1 "


def _prf(key: bytes, label: bytes, data: bytes = b"") -> bytes:
    return hmac.digest(key, _LABEL + label + b"\0" + data, "sha256")


def _binding(hello: Hello) -> bytes:
    fields = [
        hello.version, hello.page_size, list(hello.features), hello.streams, hello.auth,
        hello.recorded, hello.nonce, hello.session, hello.stream,
    ]
    return msgpack.packb(fields, use_bin_type=True)


def transcript(source_hello: Hello, dest_hello: Hello | None = None) -> bytes:
    digest = hashlib.sha256(_binding(source_hello))
    if dest_hello is not None:
        digest.update(_binding(dest_hello))
    return digest.digest()


def dest_proof(secret: bytes, th: bytes) -> bytes:
    return _prf(secret, b"dest proof", th)


def source_proof(secret: bytes, th: bytes) -> bytes:
    return _prf(secret, b"source proof", th)


def recorded_proof(secret: bytes, th: bytes) -> bytes:
    return _prf(secret, b"recorded proof", th)


def proof_matches(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


@dataclass(frozen=True, slots=True)
class SessionKeys:
    secret: bytes           # keys parallel streams' handshakes
    source_to_dest: Mac
    dest_to_source: Mac


def session_keys(secret: bytes, th: bytes) -> SessionKeys:
    master = _prf(secret, b"session", th)
    return SessionKeys(
        secret=master,
        source_to_dest=Mac(_prf(master, b"s2d frame"), _prf(master, b"s2d payload")),
        dest_to_source=Mac(_prf(master, b"d2s frame"), _prf(master, b"d2s payload")),
    )
