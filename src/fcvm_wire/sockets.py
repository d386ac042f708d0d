"""Socket helpers shared by the host and the guest (standard library only)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator


class ShortRead(ConnectionError):
    """The stream ended before the bytes asked for arrived; `received` says how many did."""

    def __init__(self, expected: int, received: int) -> None:
        super().__init__(f"the stream ended after {received} of {expected} bytes")
        self.expected = expected
        self.received = received


def read_exact(source: socket.socket | int, size: int) -> bytes:
    """Exactly `size` bytes from a socket or a file descriptor; ShortRead if the stream ends first."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        if isinstance(source, socket.socket):
            count = source.recv_into(view[received:])
        else:
            count = os.readv(source, [view[received:]])
        if count == 0:
            raise ShortRead(size, received)
        received += count
    return bytes(buffer)


@contextlib.contextmanager
def closed_on_error(sock: socket.socket) -> Iterator[socket.socket]:
    """Close `sock` if the block raises (and re-raise), so a failed setup never leaks its descriptor."""
    try:
        yield sock
    except BaseException:
        sock.close()
        raise


def connect(address: str | os.PathLike[str] | tuple[int, int], *, timeout: float | None = None,
            send_timeout: float | None = None) -> socket.socket:
    """A stream socket connected to `address`: a Unix socket path, or an AF_VSOCK (cid, port). The socket is
    closed again when the connect fails.

    `timeout` is the socket's timeout during the connect and after it, as with socket.create_connection (0 makes
    it non-blocking). `send_timeout` sets SO_SNDTIMEO first, which is what bounds a blocking connect to a Unix
    listener whose backlog is full."""
    target = address if isinstance(address, tuple) else os.fspath(address)
    family = socket.AF_VSOCK if isinstance(address, tuple) else socket.AF_UNIX
    with closed_on_error(socket.socket(family, socket.SOCK_STREAM)) as sock:
        if send_timeout is not None:
            seconds, fraction = divmod(send_timeout, 1.0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", int(seconds), int(fraction * 1_000_000)))
        sock.settimeout(timeout)
        sock.connect(target)
    return sock
