"""Exec over the agent channel (host -> guest port GUEST_EXEC), one connection per exec.

1. host sends one JSON line: {"id", "argv", "target": "container"|"vm", "tty", "interactive", "rows", "cols",
   "env"}.
2. guest answers one JSON line: {"ack": id} *before* running anything, or {"error": "..."}. A request id is
   run at most once: a host that lost the ack may retry with the same id and gets {"error": "duplicate"}.
3. then frames both ways: [u8 kind][u32 big-endian length][payload].
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

STDIN, STDOUT, STDERR, EXIT, RESIZE, STDIN_EOF = range(6)
_HEADER = struct.Struct(">BI")
MAX_FRAME = 1 << 20


class ExecProtocolError(ValueError):
    pass


@dataclass
class ExecRequest:
    id: str
    argv: list[str]
    target: str = "container"
    tty: bool = False
    interactive: bool = False
    rows: int = 24
    cols: int = 80
    env: dict[str, str] = field(default_factory=dict)

    def to_line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> ExecRequest:
        try:
            data: Any = json.loads(line)
            request = cls(**data)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
            raise ExecProtocolError(f"bad exec request: {exc}") from None
        if not request.argv or not all(isinstance(a, str) for a in request.argv):
            raise ExecProtocolError("exec needs a command")
        if request.target not in ("container", "vm"):
            raise ExecProtocolError(f"unknown exec target {request.target!r}")
        return request


def frame(kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def exit_frame(code: int) -> bytes:
    return frame(EXIT, str(code).encode())


def resize_frame(rows: int, cols: int) -> bytes:
    return frame(RESIZE, struct.pack(">HH", rows, cols))


def parse_resize(payload: bytes) -> tuple[int, int]:
    rows, cols = struct.unpack(">HH", payload)
    return rows, cols


def read_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def read_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next frame, or None at a clean end of stream."""
    header = read_exact(sock, _HEADER.size)
    if header is None:
        return None
    kind, length = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ExecProtocolError(f"exec frame of {length} bytes exceeds {MAX_FRAME}")
    payload = read_exact(sock, length)
    if payload is None:
        raise ExecProtocolError("exec stream ended inside a frame")
    return kind, payload


def read_line(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    """One newline-terminated line, read byte-wise so no frame bytes are consumed."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise ExecProtocolError("exec stream ended before the line did")
        line += byte
        if len(line) > limit:
            raise ExecProtocolError("exec line too long")
    return bytes(line)
