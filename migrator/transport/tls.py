"""TLS for TCP links: ``ssl.SSLContext``s built from PEM files, and the handshake, each failure a
one-line ``TransportError``.

Pages are process memory (keys, passwords): TLS keeps them confidential on the wire. It does not
replace the token: a server certificate says who the destination is, not who may send it pages,
so the token handshake and per-frame MACs run on top of TLS unchanged.

The client checks the server's certificate against the host of the address it connects to, also
for an IP address: such a certificate needs that address as an IP subjectAltName.
"""

from __future__ import annotations

import ssl

import trio

from ..core.errors import TransportError
from ._address import Address
from ._tls_stream import TLSStream, ssl_reason

MIN_VERSION = ssl.TLSVersion.TLSv1_2
# verify codes (X509_V_ERR_*) that mean "this certificate is for another name or address"
_NAME_MISMATCH = {62, 64}        # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
_UNTRUSTED = {2, 18, 19, 20, 21}  # no trusted issuer, or a self-signed certificate not trusted
# handshake failure reasons that mean "the peer talks something else than TLS"
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A destination's context: the certificate chain ``cert`` (PEM, the server's certificate
    first) and its unencrypted private key ``key`` (PEM)."""
    _load_certificates(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, "--tls-cert", "certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    context.options |= ssl.OP_NO_RENEGOTIATION   # TLSStream does not handle it (TLS 1.2 only)

    def no_password() -> bytes:
        raise TransportError(f"--tls-key {key}: the key is encrypted; give an unencrypted key (openssl pkey -in KEY -out PLAIN)")

    try:
        context.load_cert_chain(cert, key, password=no_password)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise TransportError(f"--tls-key {key}: this key does not belong to the certificate in {cert}") from None
            raise TransportError(f"--tls-key {key}: not a PEM private key ({ssl_reason(exc)})") from None
        raise TransportError(f"--tls-key {key}: cannot read the private key: {exc.strerror or exc}") from None
    return context


def client_context(ca: str | None) -> ssl.SSLContext:
    """A source's context: the server's certificate must chain to ``ca`` (a CA bundle, or the
    server's self-signed certificate itself), or to the system's CAs when ``ca`` is None."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED, check_hostname
    context.minimum_version = MIN_VERSION
    context.options |= ssl.OP_NO_RENEGOTIATION   # TLSStream does not handle it (TLS 1.2 only)
    if ca is None:
        context.load_default_certs()
    else:
        _load_certificates(context, ca, "--tls-ca", "CA certificate")
    return context


def _load_certificates(context: ssl.SSLContext, path: str, option: str, what: str) -> None:
    """Load ``path`` as trusted certificates (for the server's own chain: only to check that the
    file holds one, with an error naming the file)."""
    try:
        with open(path, "rb"):
            pass
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TransportError(f"{option} {path}: no PEM {what} in it ({ssl_reason(exc)})") from None
    except OSError as exc:
        raise TransportError(f"{option} {path}: cannot read the {what}: {exc.strerror or exc}") from None


def check_tls_address(target: Address, tls: ssl.SSLContext | None) -> None:
    """Refuse TLS on a unix socket: it never leaves this host, so there is nothing to hide."""
    if tls is not None and target.kind == "unix":
        raise TransportError(f"{target}: TLS is for TCP links only; a unix socket never leaves this host (drop the TLS options)")


async def handshake(stream: TLSStream, name: str) -> None:
    """Run the TLS handshake now (the caller's timeout covers it), so that a failure is reported
    as a TLS failure and never surfaces later as a broken read."""
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, OSError) as exc:
        raise TransportError(f"{name}: TLS handshake failed: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    """Why a TLS handshake failed, in a few words for an operator."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = f"certificate verify failed: {cause.verify_message}"
        if cause.verify_code in _NAME_MISMATCH:
            why += " (the certificate must name the host or IP address connected to; an IP address needs an IP subjectAltName)"
        elif cause.verify_code in _UNTRUSTED:
            why += " (the certificate is signed by neither the --tls-ca given nor, with --tls, a system CA)"
        return why
    if isinstance(cause, ssl.SSLError):
        reason = getattr(cause, "reason", None)
        if reason in _NOT_TLS:
            return f"the peer does not speak TLS ({ssl_reason(cause)})"
        if isinstance(cause, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
            return "the peer closed the connection mid-handshake (it does not speak TLS, or refused the certificate)"
        if reason and reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_")):
            return f"the peer refused the handshake ({ssl_reason(cause)})"
        return ssl_reason(cause)
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.strerror} (does the peer speak TLS?)"
    if isinstance(cause, trio.BrokenResourceError):
        return "the peer closed the connection mid-handshake (does it speak TLS?)"
    return str(cause) or type(cause).__name__
