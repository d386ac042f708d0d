"""Agent channel throughput and latency over the host-only loopback (no VM).

    python bench/channel.py [--mib 256] [--pings 2000]

Topology: this process runs the host bridge (`SerialVsockBridge`) and the clients (`connect_vsock`); a
child process stands in for QEMU + guest: it listens where QEMU's chardev would and runs the guest mux
(`fc_agent.channel.SerialChannel`) on the accepted connection, serving sink / echo / source ports. The
same child also serves the same handlers on a plain Unix socket, the baseline of the ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

SINK, ECHO, SOURCE = 1, 2, 3
CHUNK = 1 << 18


# --- the child: guest side ----------------------------------------------------------------------------


def _sink(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    total = 0
    while n := conn.recv_into(buf):
        total += n
    conn.sendall(struct.pack(">Q", total))
    conn.close()


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()


def _source(conn: socket.socket) -> None:
    (size,) = struct.unpack(">Q", _recv_exactly(conn, 8))
    block = b"s" * CHUNK
    while size > 0:
        conn.sendall(block[: min(size, CHUNK)])
        size -= CHUNK
    conn.close()


HANDLERS: dict[int, Callable[[socket.socket], None]] = {SINK: _sink, ECHO: _echo, SOURCE: _source}


def _accept_loop(accept: Callable[[], socket.socket], handler: Callable[[socket.socket], None]) -> None:
    while True:
        conn = accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def guest_main(serial: str, plain: str) -> None:
    from fc_agent.channel import SerialChannel

    plain_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    plain_server.bind(plain)
    plain_server.listen(64)

    def plain_accept() -> None:
        while True:
            conn, _ = plain_server.accept()
            port = conn.recv(1)[0]
            threading.Thread(target=HANDLERS[port], args=(conn,), daemon=True).start()

    threading.Thread(target=plain_accept, daemon=True).start()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(serial)
    server.listen(1)
    print("ready", flush=True)
    conn, _ = server.accept()
    channel = SerialChannel(conn.detach())
    for port, handler in HANDLERS.items():
        listener = channel.listen(port)
        threading.Thread(target=_accept_loop, args=(listener.accept, handler), daemon=True).start()
    sys.stdin.read()  # until the parent goes away


# --- the parent: host side ----------------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        data = sock.recv(size - len(buf))
        if not data:
            raise EOFError("short read")
        buf += data
    return bytes(buf)


class Target:
    def __init__(self, name: str, connect: Callable[[int], socket.socket]) -> None:
        self.name = name
        self.connect = connect

    def upload(self, size: int) -> None:
        sock = self.connect(SINK)
        block = memoryview(b"u" * CHUNK)
        left = size
        while left > 0:
            sock.sendall(block[: min(left, CHUNK)])
            left -= CHUNK
        sock.shutdown(socket.SHUT_WR)
        (got,) = struct.unpack(">Q", _recv_exactly(sock, 8))
        assert got == size, (got, size)
        sock.close()

    def download(self, size: int) -> None:
        sock = self.connect(SOURCE)
        sock.sendall(struct.pack(">Q", size))
        buf = bytearray(CHUNK)
        got = 0
        while n := sock.recv_into(buf):
            got += n
        assert got == size, (got, size)
        sock.close()

    def pings(self, count: int) -> list[float]:
        sock = self.connect(ECHO)
        rtts = []
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(b"!")
            sock.recv(1)
            rtts.append(time.perf_counter() - t0)
        sock.close()
        return rtts


def _rate(size: int, fn: Callable[[], None], streams: int = 1) -> float:
    threads = [threading.Thread(target=fn) for _ in range(streams)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return size * streams / (time.perf_counter() - t0) / 1e6


def measure(target: Target, mib: int, pings: int) -> dict[str, float]:
    size = mib << 20
    per_stream = size // 8
    target.upload(4 << 20)  # warm-up
    rtts = sorted(target.pings(pings))
    return {
        "upload 1 stream MB/s": _rate(size, lambda: target.upload(size)),
        "download 1 stream MB/s": _rate(size, lambda: target.download(size)),
        "upload 8 streams MB/s": _rate(per_stream, lambda: target.upload(per_stream), streams=8),
        "download 8 streams MB/s": _rate(per_stream, lambda: target.download(per_stream), streams=8),
        "rtt p50 us": statistics.median(rtts) * 1e6,
        "rtt p99 us": rtts[int(len(rtts) * 0.99) - 1] * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="bytes per throughput run (MiB)")
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--guest", nargs=2, metavar=("SERIAL", "PLAIN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.guest:
        guest_main(*args.guest)
        return

    from fcvm.channel import SerialVsockBridge, connect_vsock

    with tempfile.TemporaryDirectory(prefix="chbench") as tmp:
        d = Path(tmp)
        serial, plain, uds = d / "serial", d / "plain", d / "v.sock"
        child = subprocess.Popen(
            [sys.executable, __file__, "--guest", str(serial), str(plain)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert child.stdout is not None
        child.stdout.readline()
        bridge = SerialVsockBridge(serial, uds)
        bridge.start()
        try:
            assert bridge.wait_ready(10), "guest mux did not answer"

            def plain_connect(port: int) -> socket.socket:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(plain))
                sock.sendall(bytes([port]))
                return sock

            results = {
                "channel": measure(Target("channel", lambda p: connect_vsock(uds, p, 5)), args.mib, args.pings),
                "unix": measure(Target("unix", plain_connect), args.mib, args.pings),
            }
        finally:
            bridge.close()
            child.kill()
            child.wait()
    print(f"{'metric':<26}{'channel':>12}{'plain unix':>12}{'ratio':>8}")
    for key in results["channel"]:
        mux_value, base = results["channel"][key], results["unix"][key]
        print(f"{key:<26}{mux_value:>12.1f}{base:>12.1f}{mux_value / base:>8.2f}")


if __name__ == "__main__":
    main()
