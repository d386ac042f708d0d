"""The agent channel end to end on the host: SerialVsockBridge <-> stand-in QEMU chardev <-> guest mux.

The client side always speaks Firecracker's protocol (`connect_vsock`, `<uds>_<port>` listeners), so these
tests hold the bridge to Firecracker's host-side semantics."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fc_agent.channel import SerialChannel
from fcvm.channel import HOST_PORT_BASE, SerialVsockBridge, VsockConnectError, connect_vsock
from fcvm_standins.loopback import LoopbackQemu
from fcvm_wire import mux
from fcvm_wire.sockets import read_exact

pytestmark = pytest.mark.timeout(120)

ECHO = 1024


@dataclass
class Rig:
    dir: Path
    qemu: LoopbackQemu
    bridge: SerialVsockBridge
    guest: SerialChannel

    @property
    def uds(self) -> Path:
        return self.bridge.uds_path

    def restart_guest(self, *, leave_half_a_frame: bool = False) -> SerialChannel:
        self.guest.close()
        if leave_half_a_frame:  # what a guest killed in the middle of a write leaves in the pipe
            self.qemu.inject(mux.encode(mux.Kind.DATA, 2, b"h" * 60000)[:1000], to_host=True)
        self.guest = SerialChannel(self.qemu.guest_fd())
        return self.guest

    def host_listener(self, port: int) -> socket.socket:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(f"{self.uds}_{port}")
        server.listen(128)
        return server


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can get long.
    base = Path(os.environ.get("TMPDIR", "/tmp"))
    short = Path(tempfile.mkdtemp(prefix="ch", dir=base))
    qemu = LoopbackQemu(short / "serial")
    bridge = SerialVsockBridge(short / "serial", short / "v.sock")
    bridge.start()
    guest = SerialChannel(qemu.guest_fd())
    rig = Rig(short, qemu, bridge, guest)
    assert bridge.wait_ready(10) and guest.wait_ready(10)
    try:
        yield rig
    finally:
        rig.guest.close()
        bridge.close()
        qemu.close()
        for leftover in short.iterdir():
            leftover.unlink()
        short.rmdir()


def serve(listener: object, handler: Callable[[socket.socket], None]) -> threading.Thread:
    """Accept forever on a guest Listener or a host socket, one thread per connection."""

    def loop() -> None:
        while True:
            try:
                conn = listener.accept()  # type: ignore[attr-defined]
            except OSError:
                return
            if isinstance(conn, tuple):
                conn = conn[0]
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(1 << 16):
            conn.sendall(data)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_host_to_guest_connect_ok_and_echo(rig: Rig) -> None:
    serve(rig.guest.listen(ECHO), echo)
    with connect_vsock(rig.uds, ECHO, 5) as sock:
        sock.sendall(b"ping")
        assert read_exact(sock, 4) == b"ping"
    # The raw protocol, exactly as Firecracker speaks it: any case, OK <hostport> from 2**30.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(rig.uds))
        raw.sendall(b"connect 1024\nearly bytes")  # bytes after the newline belong to the stream
        line = b""
        while not line.endswith(b"\n"):
            line += raw.recv(1)
        word, port = line.split()
        assert word == b"OK" and int(port) >= HOST_PORT_BASE
        assert read_exact(raw, 11) == b"early bytes"


def test_guest_to_host_reaches_uds_port_listener(rig: Rig) -> None:
    server = rig.host_listener(1000)
    with rig.guest.connect(1000, timeout=5) as guest_sock:
        conn, _ = server.accept()
        with conn:
            guest_sock.sendall(b"status: up")
            assert read_exact(conn, 10) == b"status: up"
            conn.sendall(b"plan")
            assert read_exact(guest_sock, 4) == b"plan"
    server.close()


def test_connect_to_a_guest_port_nobody_listens_on_is_refused_not_left_to_time_out(rig: Rig) -> None:
    # A generous handshake deadline: the answer must be a refusal (the guest closed the stream), never
    # the "no answer within 60 s" that a connection left hanging ends in.
    with pytest.raises(VsockConnectError) as excinfo:
        connect_vsock(rig.uds, 4242, 60)
    assert excinfo.value.refused
    assert "without OK" in str(excinfo.value) and "port 4242" in str(excinfo.value)


def test_connect_vsock_names_a_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(VsockConnectError, match="does not exist"):
        connect_vsock(tmp_path / "nope.sock", ECHO, 1)


def test_bad_connect_lines_are_closed(rig: Rig) -> None:
    for request in (b"HELLO 1024\n", b"CONNECT x\n", b"CONNECT " + b"1" * 40 + b"\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(5)
            raw.connect(str(rig.uds))
            raw.sendall(request)
            with contextlib.suppress(ConnectionResetError):  # over-long line: closed with bytes unread
                assert raw.recv(100) == b""


def test_guest_connect_to_a_host_port_without_listener_is_reset(rig: Rig) -> None:
    with pytest.raises(ConnectionResetError, match="nothing listens on host port 5000"):
        rig.guest.connect(5000, timeout=5)


def test_64_concurrent_streams_both_directions_byte_for_byte(rig: Rig) -> None:
    serve(rig.guest.listen(ECHO), echo)
    server = rig.host_listener(5000)
    serve(server, echo)
    rng = random.Random(1)
    payloads = [rng.randbytes(rng.randint(1, 400_000)) for _ in range(64)]
    failures: list[str] = []

    def exchange(index: int) -> None:
        try:
            sock = connect_vsock(rig.uds, ECHO, 10) if index % 2 else rig.guest.connect(5000, timeout=10)
            with sock:
                payload = payloads[index]
                writer = threading.Thread(target=sock.sendall, args=(payload,))
                writer.start()
                got = read_exact(sock, len(payload))
                writer.join()
                if got != payload:
                    failures.append(f"stream {index}: payload differs")
        except Exception as exc:
            failures.append(f"stream {index}: {exc!r}")

    threads = [threading.Thread(target=exchange, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    wait_for(lambda: not rig.bridge.engine.streams)
    server.close()


def test_64_mib_transfer_does_not_starve_an_interactive_stream(rig: Rig) -> None:
    digests: list[str] = []

    def sink(conn: socket.socket) -> None:
        with conn:
            digest = hashlib.sha256()
            while data := conn.recv(1 << 18):
                digest.update(data)
            digests.append(digest.hexdigest())
            conn.sendall(b"done")

    serve(rig.guest.listen(2000), sink)
    serve(rig.guest.listen(ECHO), echo)
    payload = random.Random(2).randbytes(64 << 20)
    bulk = connect_vsock(rig.uds, 2000, 5)
    ping = connect_vsock(rig.uds, ECHO, 5)
    bulk_done = threading.Event()

    def send_bulk() -> None:
        bulk.sendall(payload)
        bulk.shutdown(socket.SHUT_WR)
        bulk_done.set()

    sender = threading.Thread(target=send_bulk)
    ping.settimeout(60)  # a starved stream fails here instead of hanging
    sender.start()
    # Pings answered while the bulk sender is still pushing: a stream queued behind the 64 MiB would get
    # its first answer only after the transfer (bench/channel.py measures the latencies).
    answered_during_bulk = 0
    deadline = time.monotonic() + 300
    while not bulk_done.is_set() and time.monotonic() < deadline:
        ping.sendall(b"!")
        assert ping.recv(1) == b"!"
        answered_during_bulk += not bulk_done.is_set()
        time.sleep(0.005)
    sender.join(timeout=60)
    assert bulk_done.is_set(), "the 64 MiB transfer did not finish within 300 s"
    assert recv_all(bulk) == b"done"
    assert digests == [hashlib.sha256(payload).hexdigest()]
    assert answered_during_bulk >= 5
    bulk.close()
    ping.close()


def test_half_close_host_to_guest(rig: Rig) -> None:
    def reverse_after_eof(conn: socket.socket) -> None:
        with conn:
            data = recv_all(conn)  # the host's EOF arrives
            conn.sendall(data[::-1])  # and this direction still flows

    serve(rig.guest.listen(3000), reverse_after_eof)
    with connect_vsock(rig.uds, 3000, 5) as sock:
        sock.sendall(b"abcdef" * 100_000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == (b"abcdef" * 100_000)[::-1]


def test_half_close_guest_to_host(rig: Rig) -> None:
    server = rig.host_listener(6000)
    with rig.guest.connect(6000, timeout=5) as guest_sock:
        conn, _ = server.accept()
        guest_sock.sendall(b"request")
        guest_sock.shutdown(socket.SHUT_WR)
        assert recv_all(conn) == b"request"

        def reply() -> None:
            with conn:
                conn.sendall(b"x" * 1_000_000)

        replier = threading.Thread(target=reply)
        replier.start()
        assert recv_all(guest_sock) == b"x" * 1_000_000
        replier.join()
    server.close()


def test_host_client_closing_mid_transfer_ends_the_guest_stream(rig: Rig) -> None:
    outcome: list[str] = []

    def flood(conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    conn.sendall(b"z" * 65536)
            except OSError as exc:
                outcome.append(type(exc).__name__)

    serve(rig.guest.listen(3100), flood)
    sock = connect_vsock(rig.uds, 3100, 5)
    read_exact(sock, 1 << 20)
    sock.close()  # with unread data: abrupt
    wait_for(lambda: bool(outcome))
    assert outcome[0] in ("BrokenPipeError", "ConnectionResetError")
    wait_for(lambda: not rig.bridge.engine.streams and not rig.guest.engine.streams)
    # The channel is unaffected.
    serve(rig.guest.listen(ECHO), echo)
    with connect_vsock(rig.uds, ECHO, 5) as fresh:
        fresh.sendall(b"still here")
        assert read_exact(fresh, 10) == b"still here"


def test_guest_closing_mid_transfer_closes_the_host_connection(rig: Rig) -> None:
    def read_some_then_close(conn: socket.socket) -> None:
        read_exact(conn, 100_000)
        conn.close()

    serve(rig.guest.listen(3200), read_some_then_close)
    sock = connect_vsock(rig.uds, 3200, 5)
    with pytest.raises(OSError):
        for _ in range(10_000):  # 640 MiB: far more than any buffer on the way
            sock.sendall(b"q" * 65536)
    sock.close()
    wait_for(lambda: not rig.bridge.engine.streams and not rig.guest.engine.streams)


def flood(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while True:
            sock.sendall(b"w" * 65536)


@pytest.mark.parametrize("half_frame", [False, True])
def test_guest_restart_resets_old_streams_and_new_ones_work(rig: Rig, half_frame: bool) -> None:
    serve(rig.guest.listen(ECHO), echo)
    old = connect_vsock(rig.uds, ECHO, 5)
    old.sendall(b"before")
    assert read_exact(old, 6) == b"before"
    busy = connect_vsock(rig.uds, ECHO, 5)  # a transfer in flight while the guest dies
    pump = threading.Thread(target=flood, args=(busy,))
    pump.start()
    time.sleep(0.05)
    sessions = rig.bridge.engine.sessions
    guest = rig.restart_guest(leave_half_a_frame=half_frame)
    assert guest.wait_ready(10)
    wait_for(lambda: rig.bridge.engine.sessions > sessions)
    old.settimeout(5)
    try:
        leftover = recv_all(old)
    except ConnectionResetError:
        leftover = b""
    assert leftover == b""
    busy.close()
    pump.join()
    serve(guest.listen(ECHO), echo)
    with connect_vsock(rig.uds, ECHO, 5) as fresh:
        fresh.sendall(b"after")
        assert read_exact(fresh, 5) == b"after"


def test_bridge_reconnects_when_the_chardev_connection_drops(rig: Rig) -> None:
    serve(rig.guest.listen(ECHO), echo)
    old = connect_vsock(rig.uds, ECHO, 5)
    connections = rig.qemu.host_connections
    rig.qemu.drop_host()
    wait_for(lambda: rig.qemu.host_connections > connections)
    assert rig.bridge.wait_ready(10)
    old.settimeout(5)
    assert recv_all(old) == b""
    wait_for(lambda: rig.guest.ready)
    with connect_vsock(rig.uds, ECHO, 5) as fresh:
        fresh.sendall(b"again")
        assert read_exact(fresh, 5) == b"again"


def test_connection_limit() -> None:
    short = Path(tempfile.mkdtemp(prefix="cl", dir="/tmp"))
    try:
        with LoopbackQemu(short / "serial") as qemu, SerialVsockBridge(
            short / "serial", short / "v.sock", max_connections=4
        ) as bridge:
            guest = SerialChannel(qemu.guest_fd())
            assert bridge.wait_ready(10)
            serve(guest.listen(ECHO), echo)
            open_socks = [connect_vsock(short / "v.sock", ECHO, 5) for _ in range(4)]
            with pytest.raises(VsockConnectError):
                connect_vsock(short / "v.sock", ECHO, 5)
            open_socks.pop().close()
            wait_for(lambda: len(bridge.engine.streams) == 3)
            open_socks.append(connect_vsock(short / "v.sock", ECHO, 5))
            for sock in open_socks:
                sock.close()
            guest.close()
        assert not (short / "v.sock").exists()
    finally:
        for leftover in short.iterdir():
            leftover.unlink()
        short.rmdir()


def test_uds_is_removed_on_close_and_a_stale_one_replaced(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(uds))
    stale.close()  # the file stays, nobody listens: what a crashed bridge leaves behind
    bridge = SerialVsockBridge(tmp_path / "missing-serial", uds)
    bridge.start()
    assert uds.exists()
    # No QEMU yet: a CONNECT is closed after the connect timeout instead of hanging.
    with pytest.raises(VsockConnectError):
        connect_vsock(uds, ECHO, 5)
    bridge.close()
    assert not uds.exists()


def test_garbage_in_the_pipe_resets_the_session_not_the_process(rig: Rig) -> None:
    """A corrupted byte stream (here: bytes injected towards the guest) is logged, the session is
    re-established, and new streams work."""
    serve(rig.guest.listen(ECHO), echo)
    sessions = rig.guest.engine.sessions
    rig.qemu.inject(bytes([200]) + os.urandom(64), to_host=False)
    wait_for(lambda: rig.guest.engine.sessions > sessions)
    wait_for(lambda: rig.bridge.ready and rig.guest.ready)
    with connect_vsock(rig.uds, ECHO, 5) as fresh:
        fresh.sendall(b"recovered")
        assert read_exact(fresh, 9) == b"recovered"


def test_find_serial_port_by_name(tmp_path: Path) -> None:
    from fc_agent.channel import find_serial_port

    sys_dir, dev_dir = tmp_path / "virtio-ports", tmp_path / "dev"
    for name, port in (("vport1p1", "org.qemu.guest_agent.0"), ("vport1p2", "org.fcvm.agent")):
        (sys_dir / name).mkdir(parents=True)
        (sys_dir / name / "name").write_text(port + "\n")
        (sys_dir / name / "dev").write_text("252:2\n")
    dev_dir.mkdir()
    (dev_dir / "vport1p2").touch()  # as devtmpfs would have made it
    assert find_serial_port(sys_dir=sys_dir, dev_dir=dev_dir) == dev_dir / "vport1p2"
    assert find_serial_port("org.other", sys_dir=sys_dir, dev_dir=dev_dir) is None
    assert find_serial_port(sys_dir=tmp_path / "absent", dev_dir=dev_dir) is None


def test_serial_listener_fileno_is_readable_while_a_connection_waits(rig: Rig) -> None:
    import select

    listener = rig.guest.listen(7000)
    assert select.select([listener], [], [], 0)[0] == []
    client = connect_vsock(rig.uds, 7000, 5)
    assert select.select([listener], [], [], 5)[0] == [listener]
    conn = listener.accept(timeout=1)
    assert select.select([listener], [], [], 0)[0] == []
    with pytest.raises(TimeoutError):
        listener.accept(timeout=0.05)
    with pytest.raises(OSError, match="already listened"):
        rig.guest.listen(7000)
    listener.close()
    conn.close()
    client.close()
