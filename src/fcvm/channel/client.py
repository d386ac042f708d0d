"""Host -> guest connections through a vsock Unix socket (Firecracker's, or the QEMU bridge's)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from fcvm.core.errors import FcvmError
from fcvm_wire.sockets import closed_on_error, connect

MAX_LINE = 32


class VsockConnectError(FcvmError):
    """The connection to a guest port failed. `refused` means the VM answered but nothing listens on
    the port (yet); otherwise the VM's vsock socket is missing, dead or too slow."""

    def __init__(self, message: str, *, port: int, refused: bool = False, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.port = port
        self.refused = refused


def connect_vsock(uds_path: Path, port: int, timeout: float = 5.0) -> socket.socket:
    """Connect to guest `port`: `CONNECT <port>\\n`, then expect `OK <hostport>\\n`.

    Returns a blocking socket carrying the raw stream (the timeout covers only the handshake).
    Raises VsockConnectError with a one-line reason otherwise."""
    deadline = time.monotonic() + timeout
    try:
        with closed_on_error(connect(uds_path, timeout=timeout)) as sock:
            sock.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                byte = sock.recv(1)  # one at a time: the guest's bytes follow the newline directly
                if not byte:
                    raise VsockConnectError(
                        f"vsock port {port}: the VM closed the connection without OK",
                        port=port,
                        refused=True,
                        hint=f"nothing listens on port {port} in the guest (yet)",
                    )
                line += byte
                if len(line) > MAX_LINE:
                    break
            words = line.split()
            if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
                raise VsockConnectError(f"vsock port {port}: unexpected answer {line[:MAX_LINE]!r}", port=port)
            sock.settimeout(None)
            return sock
    except FileNotFoundError:
        raise VsockConnectError(
            f"vsock socket {uds_path} does not exist", port=port, hint="is the VM running?"
        ) from None
    except ConnectionRefusedError:
        raise VsockConnectError(
            f"nothing listens on vsock socket {uds_path}", port=port, hint="is the VM running?"
        ) from None
    except TimeoutError:
        raise VsockConnectError(
            f"vsock port {port}: no answer from the VM within {timeout:g} s", port=port
        ) from None
    except (ConnectionResetError, BrokenPipeError):
        raise VsockConnectError(
            f"vsock port {port}: connection closed by the VM before OK",
            port=port,
            refused=True,
            hint="nothing listens on the port in the guest, or too many connections",
        ) from None
