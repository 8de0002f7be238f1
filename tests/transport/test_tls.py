"""TLS over real loopback TCP: sessions, refused certificates, plain/TLS mix-ups, file errors, CLI."""

import functools
import json
import logging
import os
import socket
import ssl
import subprocess
import sys

import pytest
import trio
from cryptography.hazmat.primitives import serialization

from migrator.core.errors import TransportError
from migrator.guest.client import GuestClient
from migrator.guest.spawn import spawn_guest
from migrator.protocol import Ack, Acked, Connection, Digest, DigestKind, Pages, Role, RoundEnd
from harness.faultproxy import FaultProxy, Faults
from migrator.transport import client_context, connect, serve, server_context
from migrator.transport._link import NOTSENT_LOWAT, USER_TIMEOUT_MS, Counters, Link
from migrator.transport._tls_stream import TLSStream

from .helpers import BASE, LAYOUT, PS, TOKEN, page_batch, zero_batch
from .test_channel import Recorder, assert_barrier_order

MiB = 1 << 20


async def start_server(nursery, handler, *, tls, token=None, address="127.0.0.1:0", **kwargs):
    return await nursery.start(functools.partial(serve, address, handler, token=token, tls=tls, **kwargs))


async def small_migration(channel) -> list:
    """Layout, Pages of 64 KiB and 1 MiB (joined and part-by-part TLS writes), Zero, RoundEnd,
    then Digest -> Ack."""
    sent = [LAYOUT]
    for i in range(12):
        sent.append(zero_batch(i) if i % 4 == 0 else page_batch(i, pages=256 if i % 3 else 16,
                                                                kind=("text", "random")[i % 2]))
    sent += [RoundEnd(round=0), Digest(kind=DigestKind.PAGES, value=b"d" * 16)]
    for event in sent:
        await channel.send(event)
    assert await channel.receive() == Ack(of=Acked.DIGEST, ok=True)
    return sent


@pytest.mark.parametrize("streams", [1, 2])
async def test_tls_session_round_trip(certs, streams):
    recorder = Recorder()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, recorder, tls=certs.server(), token=TOKEN)
            channel = await connect(address, token=TOKEN, streams=streams, tls=certs.client())
            assert channel.streams == streams and channel.authenticated and not channel.frame_macs   # TLS guards the frames
            sent = await small_migration(channel)
            await channel.aclose()
            await recorder.done.wait()
            nursery.cancel_scope.cancel()
    assert_barrier_order(sent, recorder.events)
    assert isinstance(recorder.error, TransportError)   # the source hung up after the Ack
    stats = channel.statistics()
    assert recorder.channel.statistics().bytes_raw_received == stats.bytes_raw > 6 * MiB


async def test_a_tls_link_tunes_its_tcp_socket(certs):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    tcp = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
    try:
        Link(0, TLSStream(tcp, certs.client(), server_hostname="127.0.0.1"), Connection(Role.SOURCE, token=None),
             "tls link", Counters(1))
        assert tcp.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == USER_TIMEOUT_MS
        assert tcp.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT
    finally:
        await tcp.aclose()
        await listeners[0].aclose()


@pytest.mark.parametrize("tls", [True, False])
async def test_pages_cross_the_wire_encrypted_only_with_tls(certs, tls):
    secret = b"password=hunter2-in-process-memory;" * (PS // 35 + 1)
    pages = Pages(round=0, runs=((BASE, 4),), payload=(secret * 4)[: 4 * PS])
    recorder = Recorder()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, recorder, tls=certs.server() if tls else None)
            proxy = FaultProxy("127.0.0.1", int(address.rsplit(":", 1)[1]), record_limit=1 * MiB)
            port = await nursery.start(proxy.serve)
            async with await connect(f"127.0.0.1:{port}", token=None, compress="none",
                                     tls=certs.client() if tls else None) as channel:
                for event in (LAYOUT, pages, RoundEnd(round=0), Digest(kind=DigestKind.PAGES, value=b"x")):
                    await channel.send(event)
                assert await channel.receive() == Ack(of=Acked.DIGEST, ok=True)
            nursery.cancel_scope.cancel()
    assert recorder.events[1] == pages
    wire = bytes(proxy.recordings[0])
    assert (b"hunter2" in wire) is not tls
    assert wire.startswith(b"\x16\x03") is tls   # a TLS handshake record opens the stream


async def test_wrong_ca_and_wrong_address_are_refused_naming_tls_and_the_certificate(certs, caplog):
    caplog.set_level(logging.WARNING, logger="migrator.transport")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, Recorder(), tls=certs.server())
            with pytest.raises(TransportError, match="TLS handshake failed: certificate verify failed: .* --tls-ca") as err:
                await connect(address, token=None, tls=client_context(certs.other_ca))
            assert str(err.value).startswith(address) and "\n" not in str(err.value)
            elsewhere = await start_server(nursery, Recorder(), tls=server_context(certs.elsewhere_cert, certs.elsewhere_key))
            with pytest.raises(TransportError, match="IP address mismatch.*needs an IP subjectAltName"):
                await connect(elsewhere, token=None, tls=certs.client())
            while len(caplog.records) < 2:   # each server notices the client hang up, and logs
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("TLS handshake failed" in m and "\n" not in m for m in messages), messages


async def test_plain_client_fails_cleanly_and_the_tls_server_serves_the_next(certs, caplog):
    caplog.set_level(logging.WARNING, logger="migrator.transport")
    recorder = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, recorder, tls=certs.server(), token=TOKEN)
            with pytest.raises(TransportError, match="the destination dropped our Hello .does it want a token, or TLS"):
                await connect(address, token=TOKEN)
            channel = await connect(address, token=TOKEN, tls=certs.client())
            sent = await small_migration(channel)
            await channel.aclose()
            await recorder.done.wait()
            nursery.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records if "TLS" in r.getMessage()]
    assert len(messages) == 1 and "the peer does not speak TLS" in messages[0], messages
    assert_barrier_order(sent, recorder.events)


async def test_tls_client_against_plain_server_fails_within_the_handshake_timeout(certs):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, Recorder(), tls=None)
            with pytest.raises(TransportError, match="TLS handshake failed: .*(does not speak TLS|does it speak TLS)"):
                await connect(address, token=None, tls=certs.client(), handshake_timeout=2)
            # a listener that never answers: the handshake timeout ends the wait
            silent = trio.socket.socket()
            await silent.bind(("127.0.0.1", 0))
            silent.listen(1)
            started = trio.current_time()
            with pytest.raises(TransportError, match="no handshake within 0.5 s"):
                await connect(f"127.0.0.1:{silent.getsockname()[1]}", token=None, tls=certs.client(), handshake_timeout=0.5)
            assert trio.current_time() - started < 2
            silent.close()
            nursery.cancel_scope.cancel()


async def test_tls_on_a_unix_socket_is_refused(certs, sockdir):
    path = os.path.join(sockdir, "dest.sock")
    with trio.fail_after(10):
        with pytest.raises(TransportError, match=f"unix:{path}: TLS is for TCP links only"):
            await serve(f"unix:{path}", Recorder(), token=None, tls=certs.server())
        with pytest.raises(TransportError, match=f"unix:{path}: TLS is for TCP links only"):
            await connect(f"unix:{path}", token=None, tls=certs.client())
    assert not os.path.exists(path)


def _encrypted_key(certs) -> str:
    with open(certs.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    blob = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"secret"))
    path = os.path.join(certs.dir, "encrypted-key.pem")
    with open(path, "wb") as f:
        f.write(blob)
    return path


def test_file_errors_are_one_line_naming_the_file_and_option(certs):
    missing = os.path.join(certs.dir, "missing.pem")
    encrypted = _encrypted_key(certs)
    cases = [
        (lambda: server_context(missing, certs.key), f"--tls-cert {missing}: cannot read the certificate: No such file"),
        (lambda: server_context(certs.key, certs.key), f"--tls-cert {certs.key}: no PEM certificate in it"),
        (lambda: server_context(certs.cert, missing), f"--tls-key {missing}: cannot read the private key: No such file"),
        (lambda: server_context(certs.cert, certs.cert), f"--tls-key {certs.cert}: not a PEM private key"),
        (lambda: server_context(certs.cert, certs.elsewhere_key), f"--tls-key {certs.elsewhere_key}: this key does not belong to the certificate in {certs.cert}"),
        (lambda: server_context(certs.cert, encrypted), f"--tls-key {encrypted}: the key is encrypted"),
        (lambda: client_context(missing), f"--tls-ca {missing}: cannot read the CA certificate: No such file"),
        (lambda: client_context(certs.dir), f"--tls-ca {certs.dir}: cannot read the CA certificate: Is a directory"),
        (lambda: client_context(certs.key), f"--tls-ca {certs.key}: no PEM CA certificate in it"),
    ]
    for build, expected in cases:
        with pytest.raises(TransportError) as err:
            build()
        assert expected in str(err.value) and "\n" not in str(err.value)
    assert server_context(certs.cert, certs.key).minimum_version == client_context(None).minimum_version == ssl.TLSVersion.TLSv1_2


def test_cli_migrate_to_receive_over_tls_with_a_token(certs, sockdir):
    """``migrator migrate --tls-ca`` to ``migrator receive --tls-cert --tls-key``, both with a token."""
    token = os.path.join(sockdir, "token")
    with open(token, "wb") as f:
        f.write(TOKEN)
    dest_report, run_report = os.path.join(sockdir, "dest.json"), os.path.join(sockdir, "run.json")
    receiver = subprocess.Popen(
        [sys.executable, "-m", "migrator", "receive", "--listen", "127.0.0.1:0", "--once", "--control-dir", sockdir,
         "--token-file", token, "--tls-cert", certs.cert, "--tls-key", certs.key, "--report", dest_report],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        address = receiver.stderr.readline().strip().rsplit(" ", 1)[-1]
        with spawn_guest(os.path.join(sockdir, "src.sock"), size=32 * MiB, dirty_rate=2000, fill="text") as guest:
            source = subprocess.run(
                [sys.executable, "-m", "migrator", "migrate", "--guest", guest.control, "--to", address, "--quiet",
                 "--token-file", token, "--tls-ca", certs.ca, "--verify", "full", "--report", run_report],
                check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90,
            )
            assert source.returncode == 0, source.stderr
        assert receiver.wait(timeout=30) == 0
    finally:
        receiver.kill()
        receiver.wait()
    with open(run_report) as f:
        assert json.load(f)["verified"]
    with open(dest_report) as f:
        dest = json.load(f)
    assert dest["result"] == "resumed"
    client = GuestClient(dest["guest_control"])
    try:
        assert client.check()["clean"]
    finally:
        client.quit()


async def test_a_flipped_bit_on_the_wire_fails_the_tls_record_in_one_line(certs):
    recorder = Recorder()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await start_server(nursery, recorder, tls=certs.server())
            proxy = FaultProxy("127.0.0.1", int(address.rsplit(":", 1)[1]), Faults(corrupt_at=200_000))
            port = await nursery.start(proxy.serve)
            with pytest.raises(TransportError):
                async with await connect(f"127.0.0.1:{port}", token=None, tls=certs.client()) as channel:
                    await channel.send(LAYOUT)
                    for i in range(1, 40):
                        await channel.send(page_batch(i, pages=16, kind="random"))
                    await channel.send(Digest(kind=DigestKind.PAGES, value=b"x"))
                    await channel.receive()
            await recorder.done.wait()
            nursery.cancel_scope.cancel()
    message = str(recorder.error)
    assert "read failed (TLS: " in message and "bad record mac" in message and "_ssl.c" not in message, message
