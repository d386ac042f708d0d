"""Firecracker's host-side vsock semantics over QEMU's virtio-serial agent port.

QEMU serves the port's chardev on a Unix socket; the bridge connects to it (re-connecting whenever it
drops) and runs the host end of `fcvm_wire.mux`. At `uds_path` it behaves like Firecracker:
- host -> guest: a client connects, sends `CONNECT <port>\\n` (keyword in any case, line <= 32 bytes) and
  gets `OK <hostport>\\n` (host ports count up from 2**30) once the guest accepted, then a raw stream. If
  nothing listens in the guest, or the guest does not answer within `connect_timeout`, the connection
  is closed without a reply.
- guest -> host: a guest stream to port P is connected to the Unix socket `<uds_path>_<P>`; if nothing
  listens there the guest's connect fails with ECONNRESET.
- at most `max_connections` (1023) connections at a time; further ones are closed or refused.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import stat
from pathlib import Path

from fcvm.core import log
from fcvm.core.errors import FcvmError
from fcvm_wire import mux
from fcvm_wire.sockets import closed_on_error, connect

_log = log.get("channel")

MAX_CONNECTIONS = 1023
HOST_PORT_BASE = 1 << 30
_MAX_LINE = 32


class _Pending:
    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""


class SerialVsockBridge:
    """Runs in its own thread between `start()` and `close()`."""

    def __init__(
        self,
        serial_socket: Path,
        uds_path: Path,
        *,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = 2.0,
        retry_max: float = 1.0,
    ) -> None:
        self.serial_socket = Path(serial_socket)
        self.uds_path = Path(uds_path)
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.retry_max = retry_max
        self._log = _log
        self._listener: socket.socket | None = None
        self._listener_ino = 0
        self._pending: dict[int, _Pending] = {}
        self._next_host_port = HOST_PORT_BASE
        self._retry = 0.02
        self._closed = False
        self.engine = mux.MuxEngine(
            mux.ROLE_HOST,
            on_open=self._on_guest_open,
            on_transport_lost=self._on_lost,
            logger=_log,
            max_streams=max_connections,
            open_timeout=connect_timeout,
            name=f"bridge {self.uds_path.name}",
        )

    # --- lifecycle (any thread) ---------------------------------------------------------------------

    def start(self) -> None:
        self._listener = self._bind()
        self.engine.start()
        self.engine.call_soon_threadsafe(self._setup)

    def close(self) -> None:
        """Stop the thread, close every connection and remove the listening socket."""
        if self._closed:
            return
        self._closed = True
        self.engine.stop()
        for pending in self._pending.values():
            with contextlib.suppress(OSError):
                pending.sock.close()
        self._pending.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                if os.stat(self.uds_path).st_ino == self._listener_ino:
                    self.uds_path.unlink()

    def __enter__(self) -> SerialVsockBridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the guest end of the mux answered (the agent is up and has opened its port)."""
        return self.engine.ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self.engine.ready.is_set()

    def _bind(self) -> socket.socket:
        path = str(self.uds_path)
        with closed_on_error(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(path)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or not self._stale(path):
                    raise FcvmError(
                        f"cannot listen on {path}: {exc.strerror}", hint="another VM uses this vsock path?"
                    ) from None
                os.unlink(path)
                sock.bind(path)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            self._listener_ino = os.stat(path).st_ino
        return sock

    @staticmethod
    def _stale(path: str) -> bool:
        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                return False
        except OSError:
            return False
        try:
            connect(path).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        return False

    # --- loop thread ------------------------------------------------------------------------------

    def _setup(self) -> None:
        assert self._listener is not None
        self.engine.add_reader(self._listener, self._on_accept)
        self._connect_serial()

    def _connect_serial(self) -> None:
        if self._closed:
            return
        try:
            sock = connect(self.serial_socket, timeout=0.0)  # the loop thread must not block
        except OSError as exc:
            self._log.debug("agent port %s: %s; retrying in %.2f s", self.serial_socket, exc, self._retry)
            self.engine.call_later(self._retry, self._connect_serial)
            self._retry = min(self._retry * 2, self.retry_max)
            return
        self._retry = 0.02
        self._log.debug("connected to the agent port %s", self.serial_socket)
        self.engine.attach_transport(sock.detach())

    def _on_lost(self) -> None:
        if not self._closed:
            self.engine.call_later(self._retry, self._connect_serial)

    def _connections(self) -> int:
        return len(self.engine.streams) + len(self._pending)

    def _on_accept(self, mask: int) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._log.warning("accept on %s failed: %s", self.uds_path, exc)
                return
            if self._connections() >= self.max_connections:
                self._log.warning("%s: %d connections open; closing a new one", self.uds_path, self.max_connections)
                client.close()
                continue
            client.setblocking(False)
            self._pending[client.fileno()] = _Pending(client)
            self.engine.add_reader(client, functools.partial(self._on_request, client.fileno()))

    def _on_request(self, fd: int, mask: int) -> None:
        pending = self._pending.get(fd)
        if pending is None:
            return
        try:
            data = pending.sock.recv(_MAX_LINE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_pending(fd, close=True)
            return
        pending.buf += data
        newline = pending.buf.find(b"\n")
        if newline < 0:
            if len(pending.buf) >= _MAX_LINE:
                self._log.debug("%s: no CONNECT line in %d bytes; closing", self.uds_path, _MAX_LINE)
                self._drop_pending(fd, close=True)
            return
        line, rest = pending.buf[:newline], pending.buf[newline + 1 :]
        port = self._parse_connect(line) if newline < _MAX_LINE else None
        if port is None:
            self._log.debug("%s: bad request %r; closing", self.uds_path, line[:_MAX_LINE])
            self._drop_pending(fd, close=True)
            return
        self._drop_pending(fd, close=False)
        host_port = self._next_host_port
        self._next_host_port = HOST_PORT_BASE + (self._next_host_port + 1 - HOST_PORT_BASE) % (1 << 30)
        sock = pending.sock

        def on_result(error: int) -> None:
            if error == 0:
                with contextlib.suppress(OSError):
                    sock.send(b"OK %d\n" % host_port)
            else:
                self._log.debug("CONNECT %d: %s", port, os.strerror(error))

        self.engine.open_stream(port, sock, on_result, initial=rest)

    @staticmethod
    def _parse_connect(line: bytes) -> int | None:
        words = line.split()
        if len(words) != 2 or words[0].lower() != b"connect" or not words[1].isdigit():
            return None
        port = int(words[1])
        return port if port < 2**32 else None

    def _drop_pending(self, fd: int, *, close: bool) -> None:
        pending = self._pending.pop(fd, None)
        if pending is None:
            return
        self.engine.remove_reader(pending.sock)
        if close:
            pending.sock.close()

    def _on_guest_open(self, port: int) -> socket.socket | None:
        """The guest opened `port`: connect to `<uds_path>_<port>`, or refuse."""
        path = f"{self.uds_path}_{port}"
        try:
            # A full backlog makes a blocking connect wait up to SO_SNDTIMEO; keep that short.
            return connect(path, send_timeout=1.0)
        except OSError as exc:
            self._log.debug("guest connect to %s: %s", path, exc.strerror)
            return None
