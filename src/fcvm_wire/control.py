"""The agent's control stream (guest -> host port HOST_CONTROL): newline-delimited JSON messages.

host -> guest: {"type": "plan", "plan": {...}} (QEMU; under Firecracker the plan comes from MMDS),
               {"type": "shutdown"}
guest -> host: {"type": "hello", "agent": VERSION, "epoch": N}
               {"type": "status", "state": "starting|running|exited|failed", "exit_code": N, "detail": "..."}
               {"type": "health", "health": "healthy|unhealthy|starting"}
               {"type": "log", "stream": "stdout|stderr|agent", "line": "..."}
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

MAX_LINE = 1 << 20


class ControlError(ValueError):
    pass


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControlError(f"control message is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ControlError("control message must be an object with a string 'type'")
    return message


class ControlStream:
    """A control connection: thread-safe send, iterate to receive."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb")
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = encode(message)
        with self._send_lock:
            self.sock.sendall(data)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            line = self._reader.readline(MAX_LINE)
            if not line:
                return
            if not line.endswith(b"\n"):
                raise ControlError(f"control line longer than {MAX_LINE} bytes")
            yield decode(line)

    def close(self) -> None:
        self._reader.close()
        self.sock.close()
