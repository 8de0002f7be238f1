#!/usr/bin/env python3
"""Benchmark the migration stream: page data over loopback TCP through connect/serve.

For each kind of page data (random, half-zero pages, text-like) it measures, in the same run and
on the same bytes:

* ``sendall``: raw ``socket.sendall`` of the data to a process that only reads it;
* ``zstd``: single-thread zstd (level of ``--compress``) over the data, one Pages batch (4 MiB)
  at a time, and the same with two threads (how far two compressors really scale here);
* ``stream``: Layout, Pages of 4 MiB (the engine's batch), RoundEnd, Digest -> Ack through
  ``migrator.transport`` to a receiving process that decodes every frame (checksums,
  decompression).

Goals (issue 4): ``stream`` reaches 70 % of min(sendall, zstd) with one stream, for each kind;
on compressible (text-like) data two streams are at least 1.5x faster than one. A last line
measures the bandwidth cap's accuracy (goal: within 5 %).

Diagnostics (not goals): for compressible data, the payload codec alone on these CPUs
(``codec_rate``: N threads encode while N others decode, no sockets or event loop), which
bounds what N streams can reach while both ends share the machine; CPU seconds of each side
(whole process and its trio thread) per run; and, for random data, sendall with the congestion
control the stream picks for loopback peers
(reno rather than the system default; see ``migrator.transport._link._tune_tcp``), so that the
stream can also be compared with a raw socket tuned like it.

With ``--tls`` every stream run goes through TLS (a throwaway self-signed certificate made with
the openssl command); the baselines stay plain.

    scripts/bench_transport.py [--size 1G] [--json [FILE]] [--compress zstd:1] [--auth] [--tls]
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import trio  # noqa: E402
import zstandard  # noqa: E402

from migrator.core.model import Region  # noqa: E402
from migrator.protocol import (  # noqa: E402
    Ack, Acked, Compression, Digest, DigestKind, Layout, Pages, RoundEnd, decode_payload, encode_payload,
)
from harness.bench import finish, goal  # noqa: E402
from harness.hosts import write_certificate  # noqa: E402
from migrator.source.pages import BATCH_PAGES  # noqa: E402
from migrator.transport import client_context, connect, serve, server_context  # noqa: E402
from migrator.transport._link import LOOPBACK_CONGESTION  # noqa: E402

PS = 4096
BATCH = BATCH_PAGES * PS        # bytes per Pages event (what the source engine sends)
BLOCK = 64 << 20                # distinct data per kind; larger sizes cycle through it
BASE = 0x7F0000000000
TOKEN = b"bench-transport-token-0123456789"
KINDS = ("random", "half-zero", "text")


# --- data ------------------------------------------------------------------------------------


def make_data(kind: str, size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "half-zero":
        pages = bytearray(size)
        noise = rng.randbytes(size // 2)
        view = memoryview(pages)
        for i in range(0, size // PS, 2):   # every other page random, the rest zero
            view[i * PS : (i + 1) * PS] = noise[(i // 2) * PS : (i // 2 + 1) * PS]
        return bytes(pages)
    # text-like: Zipf-distributed pseudo-words with punctuation and line breaks
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocabulary = ["".join(rng.choices(letters, k=rng.randint(1, 9))) for _ in range(8000)]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    words = rng.choices(vocabulary, weights=weights, k=size // 5 + 1024)
    text = " ".join(words).replace("e t", "e. T").replace("s a", "s,\na").encode()
    return text[:size]


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 1G, 256M")
    size = int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]
    if size < BATCH:
        raise argparse.ArgumentTypeError(f"size must be at least {BATCH >> 20}M")
    return size - size % BATCH


def batches(data: bytes, size: int):
    view = memoryview(data)
    for offset in range(0, size, BATCH):
        start = offset % len(data)
        yield offset, view[start : start + BATCH]


# --- baselines -------------------------------------------------------------------------------


def zstd_rate(data: bytes, size: int, compression: Compression) -> tuple[float, float]:
    """Raw bytes/s of one thread compressing a batch at a time, and the compression ratio."""
    compressor = compression.compressor() or zstandard.ZstdCompressor(level=1)
    out = 0
    started = time.perf_counter()
    for _, chunk in batches(data, size):
        out += len(compressor.compress(chunk))
    return size / (time.perf_counter() - started), size / out


def zstd_threads_rate(data: bytes, size: int, compression: Compression, threads: int) -> float:
    """Raw bytes/s of ``threads`` threads, one compressor each, sharing the batches."""
    chunks = list(batches(data, size))

    def work(part) -> None:
        compressor = compression.compressor() or zstandard.ZstdCompressor(level=1)
        for _, chunk in part:
            compressor.compress(chunk)

    workers = [threading.Thread(target=work, args=(chunks[i::threads],)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return size / (time.perf_counter() - started)


def codec_rate(data: bytes, size: int, compression: Compression, threads: int) -> float:
    """Raw bytes/s of the payload codec alone on these CPUs: ``threads`` threads encode the
    batches (``encode_payload``: sampling, zero pages, zstd; one compressor each) while as many
    others decode them as they come, with no sockets, framing, checksums or event loop. This is
    what ``threads`` streams could reach with zero overhead when both ends share the machine, as
    they do here."""
    chunks = list(batches(data, size))
    packed: queue.Queue = queue.Queue(maxsize=2 * threads)

    def compress(part) -> None:
        compressor = compression.compressor() or zstandard.ZstdCompressor(level=1)
        for _, chunk in part:
            packed.put(encode_payload(compressor, chunk, page_size=PS))

    def decompress() -> None:
        decompressor = zstandard.ZstdDecompressor()
        while (frame := packed.get()) is not None:
            decode_payload(decompressor, *frame, BATCH, PS)

    compressors = [threading.Thread(target=compress, args=(chunks[i::threads],)) for i in range(threads)]
    decompressors = [threading.Thread(target=decompress) for _ in range(threads)]
    started = time.perf_counter()
    for worker in compressors + decompressors:
        worker.start()
    for worker in compressors:
        worker.join()
    for _ in decompressors:
        packed.put(None)        # the end, once for each decompressor
    for worker in decompressors:
        worker.join()
    return size / (time.perf_counter() - started)


def sendall_rate(data: bytes, size: int, congestion: bytes | None = None) -> float:
    """Raw bytes/s of socket.sendall to another process that reads everything (with the
    system's default congestion control, or ``congestion``)."""
    sink = subprocess.Popen([sys.executable, __file__, "--_sink"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            if congestion is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion)
            started = time.perf_counter()
            for _, chunk in batches(data, size):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)              # the sink's answer: it has read everything
            return size / (time.perf_counter() - started)
    finally:
        sink.wait(timeout=30)


def run_sink() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(server.getsockname()[1], flush=True)
        conn, _ = server.accept()
        with conn:
            buffer = bytearray(4 << 20)
            while conn.recv_into(buffer):
                pass
            conn.sendall(b"k")


# --- the stream ------------------------------------------------------------------------------


async def stream_rate(address: str, data: bytes, size: int, *, streams: int, compress: str, token,
                      bandwidth: float | None = None, tls=None) -> tuple[float, dict]:
    channel = await connect(address, token=token, compress=compress, streams=streams, bandwidth=bandwidth, tls=tls)
    async with channel:
        await channel.send(Layout(regions=(Region(BASE, size),), meta={"bench": True}))
        started, cpu_before, main_before = time.perf_counter(), cpu_seconds(), time.thread_time()
        for offset, chunk in batches(data, size):
            await channel.send(Pages(round=0, runs=((BASE + offset, BATCH // PS),), payload=chunk))
        await channel.send(RoundEnd(round=0))
        await channel.send(Digest(kind=DigestKind.PAGES, value=b"end"))
        ack = await channel.receive()
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds() - cpu_before
        assert type(ack) is Ack and ack.ok, ack
    stats = channel.statistics()
    return size / elapsed, {"ratio": round(stats.ratio, 3), "compress_s": round(stats.compress_seconds, 3),
                            "wire_bytes": stats.bytes_wire, "seconds": round(elapsed, 3),
                            "send_cpu_s": round(cpu, 3), "send_main_cpu_s": round(time.thread_time() - main_before, 3),
                            **{f"recv_{name}_s": round(ms / 1000, 3) for name, ms in ack.timings_ms.items()}}


def cpu_seconds() -> float:
    """CPU seconds of this process so far, every thread, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def receive_all(channel) -> None:
    """Count the page bytes of each round; at a Digest answer whether they were the Layout's
    size, with the CPU time this process spent since the session began (receiving, checking,
    decompressing)."""
    received, expected, cpu_before, main_before = 0, 0, cpu_seconds(), time.thread_time()
    while True:
        event = await channel.receive()
        if isinstance(event, Layout):
            expected = event.total_bytes
        elif isinstance(event, Pages):
            received += len(event.payload)
        elif isinstance(event, Digest):
            timings = {"cpu": (cpu_seconds() - cpu_before) * 1000, "main_cpu": (time.thread_time() - main_before) * 1000,
                       "decompress": channel.statistics().decompress_seconds * 1000}
            ok = received == expected
            reason = "" if ok else f"received {received} bytes of {expected}"
            await channel.send(Ack(of=Acked.DIGEST, ok=ok, reason=reason, timings_ms=timings))
            await channel.flush()
            received, cpu_before, main_before = 0, cpu_seconds(), time.thread_time()


def run_receiver(token, tls_dir: str | None) -> None:
    tls = server_context(os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem")) if tls_dir else None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(lambda task_status: serve("127.0.0.1:0", receive_all_quietly, token=token,
                                                                      tls=tls, task_status=task_status))
            print(address, flush=True)

    async def receive_all_quietly(channel) -> None:
        try:
            await receive_all(channel)
        except Exception:  # noqa: BLE001 - the sender closing ends each session
            pass

    trio.run(main)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"), help="bytes per data kind (default 1G)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write the results as JSON (- = stdout)")
    parser.add_argument("--compress", default="zstd:1")
    parser.add_argument("--auth", action="store_true", help="authenticate (HMAC every frame) as with a token file")
    parser.add_argument("--tls", action="store_true", help="the stream runs use TLS (a throwaway certificate)")
    parser.add_argument("--_sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_receive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_tls-dir", dest="tls_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    token = TOKEN if args.auth else None
    if args._sink:
        run_sink()
        return 0
    if args._receive:
        run_receiver(token, args.tls_dir)
        return 0

    compression = Compression.parse(args.compress)
    out = sys.stderr if args.json == "-" else sys.stdout
    tls_dir = tempfile.mkdtemp(prefix="bench-tls-") if args.tls else None
    tls = client_context(write_certificate(tls_dir, "127.0.0.1")[0]) if tls_dir else None
    receiver = subprocess.Popen([sys.executable, __file__, "--_receive"] + (["--auth"] if args.auth else [])
                                + (["--_tls-dir", tls_dir] if tls_dir else []), stdout=subprocess.PIPE, text=True)
    results, goals = [], []
    try:
        address = receiver.stdout.readline().strip()
        mb = 1e6
        print(f"{args.size >> 20} MiB per kind, {args.compress}, {'HMAC' if token else 'xxh3'} tags, "
              f"{'TLS' if tls else 'plain TCP'} streams (baselines plain), "
              f"receiver in another process, {os.cpu_count()} CPUs", file=out)
        print(f"{'data':10} {'sendall':>9} {'zstd 1T':>9} {'zstd 2T':>9} {'ratio':>6} {'1 stream':>9} "
              f"{'2 streams':>10} {'1 st/limit':>10} {'2st/1st':>8}  MB/s", file=out)
        for kind in KINDS:
            data = make_data(kind, min(BLOCK, args.size))
            sendall = sendall_rate(data, args.size)
            sendall_tuned = sendall_rate(data, args.size, LOOPBACK_CONGESTION) if kind == "random" else None
            zstd, ratio = zstd_rate(data, args.size, compression)
            zstd2 = zstd_threads_rate(data, args.size, compression, 2)
            one, one_info = trio.run(lambda: stream_rate(address, data, args.size, streams=1,
                                                         compress=args.compress, token=token, tls=tls))
            two, two_info = trio.run(lambda: stream_rate(address, data, args.size, streams=2,
                                                         compress=args.compress, token=token, tls=tls))
            limit = min(sendall, zstd) if compression.level is not None else sendall
            codec = ({n: codec_rate(data, args.size, compression, n) for n in (1, 2)}
                     if compression.level is not None and kind != "random" else None)
            results.append({"kind": kind, "sendall_Bps": sendall, "sendall_stream_cc_Bps": sendall_tuned, "zstd_Bps": zstd, "zstd2_Bps": zstd2, "zstd_ratio": ratio,
                            "codec1_Bps": codec and codec[1], "codec2_Bps": codec and codec[2],
                            "stream1_Bps": one, "stream2_Bps": two, "stream1": one_info, "stream2": two_info})
            print(f"{kind:10} {sendall / mb:9.0f} {zstd / mb:9.0f} {zstd2 / mb:9.0f} {ratio:6.2f} {one / mb:9.0f} {two / mb:10.0f} "
                  f"{one / limit:10.2f} {two / one:8.2f}", file=out)
            goals.append(goal(f"{kind}: 1 stream / min(sendall, zstd 1 thread), baseline MB/s", round(one / limit, 3),
                              round(limit / mb, 1), 0.7, one >= 0.7 * limit, stream_MBps=round(one / mb, 1)))
            if kind == "text":
                goals.append(goal("text: 2 streams / 1 stream, baseline MB/s", round(two / one, 3), round(one / mb, 1), 1.5,
                                  two >= 1.5 * one, stream2_MBps=round(two / mb, 1),
                                  zstd_2_vs_1_threads=round(zstd2 / zstd, 3),
                                  codec_alone_2_MBps=round(codec[2] / mb, 1) if codec else None,
                                  zero_overhead_ceiling=round(codec[2] / one, 3) if codec else None))
        tuned = results[0]["sendall_stream_cc_Bps"] if results and results[0]["kind"] == "random" else None
        if tuned:
            print(f"random: sendall with the congestion control the stream uses on loopback "
                  f"({LOOPBACK_CONGESTION.decode()}): {tuned / mb:.0f} MB/s; 1 stream reaches "
                  f"{results[0]['stream1_Bps'] / tuned:.2f} of it", file=out)
        print("The payload codec alone on these CPUs (encoding and, at the same time, decoding; no sockets, framing, "
              "checksums or event loop), against the streams:", file=out)
        for r in results:
            if r["codec1_Bps"]:
                print(f"  {r['kind']:10} 1 thread each {r['codec1_Bps'] / mb:5.0f} MB/s, 1 stream reaches "
                      f"{r['stream1_Bps'] / r['codec1_Bps']:.2f} of it;   2 threads each {r['codec2_Bps'] / mb:5.0f} MB/s, "
                      f"2 streams reach {r['stream2_Bps'] / r['codec2_Bps']:.2f} of it;   with zero overhead, "
                      f"2 streams / 1 stream would be at most {r['codec2_Bps'] / r['stream1_Bps']:.2f}", file=out)
        print("CPU seconds per side (whole process, and its trio thread; the rest is compression or decompression "
              "threads) and wall seconds:", file=out)
        for r in results:
            print(f"  {r['kind']:10} " + "   ".join(
                f"{n} stream{'s' if n > 1 else ''}: send {info['send_cpu_s']:.2f} ({info['send_main_cpu_s']:.2f} trio) "
                f"recv {info['recv_cpu_s']:.2f} ({info['recv_main_cpu_s']:.2f} trio) wall {info['seconds']:.2f}"
                for n, info in ((1, r["stream1"]), (2, r["stream2"]))), file=out)
        cap = 100e6
        capped_size = min(args.size, 200 << 20)
        data = make_data("random", min(BLOCK, capped_size))
        rate, _ = trio.run(lambda: stream_rate(address, data, capped_size, streams=1, compress="none", token=token,
                                               bandwidth=cap, tls=tls))
        error = abs(rate - cap) / cap
        print(f"bandwidth cap {cap / mb:.0f} MB/s: measured {rate / mb:.1f} MB/s ({error:.1%} off)", file=out)
        goals.append(goal("bandwidth cap: relative error, baseline MB/s", round(error, 4), cap / mb, 0.05, error <= 0.05,
                          measured_MBps=round(rate / mb, 2)))
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
        if tls_dir:
            shutil.rmtree(tls_dir, ignore_errors=True)
    result = {"size": args.size, "compress": args.compress, "auth": bool(token), "tls": bool(tls), "cpus": os.cpu_count(),
              "results": results, "goals": goals}
    return finish(result, goals, args.json, file=out)


if __name__ == "__main__":
    sys.exit(main())
