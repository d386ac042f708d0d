"""Guest side of the agent channel. Standard library only; imports only `fcvm_wire`.

`open_channel()` picks the transport:
- AF_VSOCK (Firecracker) when /dev/vsock exists and a guest-to-host vsock transport is registered;
- otherwise the virtio-serial port named `org.fcvm.agent` (QEMU), multiplexed by `fcvm_wire.mux`.

Both give real sockets: `Channel.connect(port)` reaches the host's `<uds>_<port>` listener, and
`Channel.listen(port).accept()` returns connections the host made with `CONNECT <port>`. Under the serial
transport each socket is one end of a socketpair that the mux pumps, so callers may pass fds around.

Differences that remain under the serial transport: a stream the host resets shows up as EOF (or
ECONNRESET if unread data was pending), and a connect while the host bridge is not attached waits up to
the timeout instead of failing at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Protocol

from fcvm_wire import mux
from fcvm_wire.ports import HOST_CID
from fcvm_wire.sockets import closed_on_error, connect

AGENT_PORT_NAME = "org.fcvm.agent"
VSOCK_DEVICE = Path("/dev/vsock")
VIRTIO_PORTS = Path("/sys/class/virtio-ports")
DEV_DIR = Path("/dev")
_IOCTL_VM_SOCKETS_GET_LOCAL_CID = 0x7B9
_VMADDR_CID_ANY = 0xFFFFFFFF

_log = logging.getLogger("fc_agent.channel")


class Listener(Protocol):
    port: int

    def accept(self, timeout: float | None = None) -> socket.socket:
        """The next connection the host opened to this port (blocking; TimeoutError after `timeout`)."""
        ...

    def fileno(self) -> int:
        """Readable while a connection is waiting to be accepted."""
        ...

    def close(self) -> None: ...


class Channel:
    """The agent channel. Use as a context manager or call close()."""

    transport = ""

    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        """Open a stream to the host's listener for `port` (guest -> host). Raises ConnectionResetError
        when nothing listens there, TimeoutError when the host does not answer in time."""
        raise NotImplementedError

    def listen(self, port: int) -> Listener:
        """Accept host -> guest connections to `port`. OSError(EADDRINUSE) if already listening."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- AF_VSOCK ---------------------------------------------------------------------------------------


class _VsockListener:
    def __init__(self, port: int) -> None:
        self.port = port
        with closed_on_error(socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)) as sock:
            sock.bind((socket.VMADDR_CID_ANY, port))
            sock.listen(128)
        self._sock = sock

    def accept(self, timeout: float | None = None) -> socket.socket:
        self._sock.settimeout(timeout)
        conn, _ = self._sock.accept()
        conn.settimeout(None)
        return conn

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


class VsockChannel(Channel):
    transport = "vsock"

    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        sock = connect((HOST_CID, port), timeout=timeout)
        sock.settimeout(None)
        return sock

    def listen(self, port: int) -> Listener:
        return _VsockListener(port)

    def close(self) -> None:
        pass


def vsock_available(device: Path = VSOCK_DEVICE) -> bool:
    """True when /dev/vsock exists and a guest->host transport is registered (the local CID is known)."""
    if not hasattr(socket, "AF_VSOCK") or not device.exists():
        return False
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        raw = fcntl.ioctl(fd, _IOCTL_VM_SOCKETS_GET_LOCAL_CID, b"\0" * 4)
        cid = struct.unpack("I", raw)[0]
    except OSError:
        return False
    finally:
        os.close(fd)
    if cid in (_VMADDR_CID_ANY, 0, 1, HOST_CID):
        return False
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


# --- virtio-serial mux ------------------------------------------------------------------------------


class _SerialListener:
    """Connections arrive from the mux thread; one notification byte per connection makes fileno()
    readable exactly while one is waiting."""

    def __init__(self, channel: SerialChannel, port: int) -> None:
        self.port = port
        self._channel = channel
        self._queue: deque[socket.socket] = deque()
        self._lock = threading.Lock()
        self._r, self._w = socket.socketpair()
        self._w.setblocking(False)
        self._closed = False

    def _push(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._queue.append(sock)
            with contextlib.suppress(BlockingIOError):
                self._w.send(b"c")
        return True

    def accept(self, timeout: float | None = None) -> socket.socket:
        if self._closed:
            raise OSError(errno.EBADF, f"listener on port {self.port} is closed")
        self._r.settimeout(timeout)
        try:
            self._r.recv(1)
        except TimeoutError:
            raise TimeoutError(errno.ETIMEDOUT, f"no connection to port {self.port} within {timeout} s") from None
        with self._lock:
            if self._closed or not self._queue:
                raise OSError(errno.EBADF, f"listener on port {self.port} is closed")
            return self._queue.popleft()

    def fileno(self) -> int:
        return self._r.fileno()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            with contextlib.suppress(OSError):
                self._w.send(b"x")  # wake a blocked accept()
            self._w.close()
        for sock in pending:
            sock.close()
        self._channel._unlisten(self)

    def __enter__(self) -> _SerialListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialChannel(Channel):
    """The mux over a byte pipe. `target` is the virtio-serial device path, a Unix socket path (tests:
    connected as a client and re-connected when it drops) or an open fd (owned from now on)."""

    transport = "serial"

    def __init__(
        self,
        target: int | str | os.PathLike[str],
        *,
        logger: logging.Logger | None = None,
        window: int = mux.DEFAULT_WINDOW,
        retry_interval: float = 0.1,
    ) -> None:
        self.log = logger or _log
        self.retry_interval = retry_interval
        self._listeners: dict[int, _SerialListener] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._path: str | None = None
        self._fd = -1  # a character device fd that survives host disconnects
        self.engine = mux.MuxEngine(
            mux.ROLE_GUEST,
            on_open=self._on_open,
            on_transport_lost=self._on_lost,
            logger=self.log,
            window=window,
            name="guest",
        )
        if isinstance(target, int):
            fd = target
        else:
            self._path = os.fspath(target)
            fd = self._open_path(self._path)
        mode = os.fstat(fd).st_mode
        if stat.S_ISCHR(mode):
            self._fd = fd
            self._path = None
        elif not stat.S_ISSOCK(mode):
            os.close(fd)
            raise OSError(errno.EINVAL, f"agent channel {target!r} is neither a character device nor a socket")
        elif isinstance(target, int):
            self._path = None  # a socket fd cannot be re-opened
        self.engine.start()
        first = fd
        self.engine.call_soon_threadsafe(lambda: self._attach(first))

    @staticmethod
    def _open_path(path: str) -> int:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return connect(path).detach()
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)

    def _attach(self, fd: int) -> None:
        if self._closed:
            if fd != self._fd:
                os.close(fd)
            return
        self.engine.attach_transport(fd, close_on_detach=fd != self._fd)

    def _on_lost(self) -> None:
        """Loop thread: the host side went away. The device reads EOF until the host reconnects."""
        if self._closed:
            return
        if self._fd >= 0:
            self.engine.call_later(self.retry_interval, lambda: self._attach(self._fd))
        elif self._path is not None:
            self.engine.call_later(self.retry_interval, self._reconnect)
        else:
            self.log.error("agent channel: the pipe closed and cannot be re-opened")

    def _reconnect(self) -> None:
        if self._closed or self._path is None:
            return
        try:
            fd = self._open_path(self._path)
        except OSError as exc:
            self.log.debug("agent channel: re-opening %s failed: %s", self._path, exc)
            self.engine.call_later(self.retry_interval, self._reconnect)
            return
        self._attach(fd)

    def _on_open(self, port: int) -> socket.socket | None:
        """Loop thread: the host opened `port`."""
        with self._lock:
            listener = self._listeners.get(port)
        if listener is None:
            return None
        theirs, ours = socket.socketpair()
        if not listener._push(theirs):
            theirs.close()
            ours.close()
            return None
        return ours

    def _unlisten(self, listener: _SerialListener) -> None:
        with self._lock:
            if self._listeners.get(listener.port) is listener:
                del self._listeners[listener.port]

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the host bridge has answered this end's HELLO."""
        return self.engine.ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self.engine.ready.is_set()

    def listen(self, port: int) -> Listener:
        if not 0 <= port < 2**32:
            raise OverflowError(f"port {port} out of range")
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "agent channel is closed")
            if port in self._listeners:
                raise OSError(errno.EADDRINUSE, f"port {port} is already listened on")
            listener = _SerialListener(self, port)
            self._listeners[port] = listener
        return listener

    def connect(self, port: int, timeout: float | None = 10.0) -> socket.socket:
        if self._closed:
            raise OSError(errno.EBADF, "agent channel is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.engine.ready.wait(timeout):
            raise TimeoutError(errno.ETIMEDOUT, f"agent channel: the host side is not connected (port {port})")
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        app, ours = socket.socketpair()
        done = threading.Event()
        result: list[int] = []

        def on_result(error: int) -> None:
            result.append(error)
            done.set()

        engine_timeout = 3600.0 if remaining is None else remaining
        self.engine.call_soon_threadsafe(
            lambda: self.engine.open_stream(port, ours, on_result, timeout=engine_timeout)
        )
        if not done.wait(None if remaining is None else remaining + 5.0) or not result:
            app.close()
            raise TimeoutError(errno.ETIMEDOUT, f"agent channel: port {port} did not answer")
        error = result[0]
        if error == 0:
            return app
        app.close()
        if error == errno.ECONNREFUSED:
            raise ConnectionResetError(errno.ECONNRESET, f"nothing listens on host port {port}")
        if error == errno.ETIMEDOUT:
            raise TimeoutError(errno.ETIMEDOUT, f"agent channel: host port {port} did not answer in time")
        raise OSError(error, f"agent channel: connect to host port {port}: {os.strerror(error)}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listeners = list(self._listeners.values())
        for listener in listeners:
            listener.close()
        self.engine.stop()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


# --- detection --------------------------------------------------------------------------------------


def find_serial_port(
    name: str = AGENT_PORT_NAME, *, sys_dir: Path = VIRTIO_PORTS, dev_dir: Path = DEV_DIR
) -> Path | None:
    """The device of the virtio-serial port called `name`, creating its node when there is no udev."""
    if not sys_dir.is_dir():
        return None
    for entry in sorted(sys_dir.iterdir()):
        try:
            if (entry / "name").read_text().strip() != name:
                continue
            device = dev_dir / entry.name
            if not device.exists():
                major, minor = (entry / "dev").read_text().strip().split(":")
                os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(int(major), int(minor)))
            return device
        except (OSError, ValueError) as exc:
            _log.warning("virtio port %s: %s", entry.name, exc)
    return None


def open_channel(timeout: float = 30.0) -> Channel:
    """The agent channel of this VM, waiting up to `timeout` for its device to appear."""
    deadline = time.monotonic() + timeout
    while True:
        if vsock_available():
            _log.debug("agent channel: AF_VSOCK")
            return VsockChannel()
        port = find_serial_port()
        if port is not None:
            _log.debug("agent channel: virtio-serial %s", port)
            return SerialChannel(port)
        if time.monotonic() >= deadline:
            raise OSError(
                errno.ENODEV,
                f"no agent channel: no vsock transport at {VSOCK_DEVICE} and no virtio-serial port "
                f"named {AGENT_PORT_NAME} under {VIRTIO_PORTS}",
            )
        time.sleep(0.05)
