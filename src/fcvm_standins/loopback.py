"""A stand-in for QEMU's virtio-serial chardev, so the channel runs without a VM (tests, bench).

Like QEMU (`-chardev socket,server=on,wait=off`) it listens at `path` and takes one host connection at a
time; bytes are relayed between that connection and the current "guest port", a socketpair whose other
end a guest-side `SerialChannel(fd)` owns. Replacing the guest port (`guest_fd()` again) is a guest
restart while the host stays connected; `drop_host()` is the chardev connection breaking.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from pathlib import Path


class LoopbackQemu:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(4)
        self._host: socket.socket | None = None
        self._guest: socket.socket | None = None
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = False
        self.host_connections = 0
        self._thread = threading.Thread(target=self._run, name="loopback-qemu", daemon=True)
        self._thread.start()

    def guest_fd(self) -> int:
        """A new guest port (the old one, if any, is closed: the guest restarted)."""
        ours, theirs = socket.socketpair()
        with self._lock:
            old, self._guest = self._guest, ours
        if old is not None:
            old.close()
        self._wake()
        return theirs.detach()

    def inject(self, data: bytes, *, to_host: bool) -> None:
        """Write raw bytes into the pipe (tests: corruption, half frames left by a dying guest)."""
        with self._lock:
            dest = self._host if to_host else self._guest
            if dest is None:
                raise OSError("no connection on that side")
            dest.sendall(data)

    def drop_host(self) -> None:
        with self._lock:
            old, self._host = self._host, None
        if old is not None:
            with contextlib.suppress(OSError):
                old.shutdown(socket.SHUT_RDWR)
            old.close()
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()
        self._thread.join(5)
        for sock in (self._host, self._guest, self._server, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def __enter__(self) -> LoopbackQemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                host, guest = self._host, self._guest
            watch = [s for s in (self._server, self._wake_r, host, guest) if s is not None]
            readable, _, _ = select.select(watch, [], [], 1.0)
            for sock in readable:
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                elif sock is self._server:
                    conn, _ = self._server.accept()
                    with self._lock:
                        old, self._host = self._host, conn
                    self.host_connections += 1
                    if old is not None:
                        old.close()
                else:
                    self._relay(sock, guest if sock is host else host)

    def _relay(self, source: socket.socket, dest: socket.socket | None) -> None:
        try:
            data = source.recv(1 << 18)
        except OSError:
            data = b""
        if not data:
            with self._lock:
                if source is self._host:
                    self._host = None
                elif source is self._guest:
                    self._guest = None
            source.close()
            return
        if dest is None:
            return  # nobody on the other side: dropped, as QEMU would
        with self._lock, contextlib.suppress(OSError):
            dest.sendall(data)
