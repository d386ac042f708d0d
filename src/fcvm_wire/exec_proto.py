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

from fcvm_wire.checks import describe, is_int, is_text, loads, object_fields
from fcvm_wire.sockets import ShortRead, read_exact

STDIN, STDOUT, STDERR, EXIT, RESIZE, STDIN_EOF = range(6)
_HEADER = struct.Struct(">BI")
MAX_FRAME = 1 << 20
_MAX_ARGV = 4096
_MAX_WORD = 128 * 1024  # MAX_ARG_STRLEN
_MAX_ID = 128


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
        """The request on `line`, or ExecProtocolError: total for any bytes."""
        data = object_fields(loads(line, ExecProtocolError, "exec request"), cls, ExecProtocolError, "exec request")
        request = cls(**data)
        if not (isinstance(request.argv, list) and 0 < len(request.argv) <= _MAX_ARGV
                and all(is_text(word, _MAX_WORD) for word in request.argv)):
            raise ExecProtocolError("exec needs a command: a list of strings")
        if request.target not in ("container", "vm"):
            raise ExecProtocolError(f"unknown exec target {describe(request.target)}")
        if not is_text(request.id, _MAX_ID) or not request.id:
            raise ExecProtocolError("exec id must be a short string")
        if not (isinstance(request.tty, bool) and isinstance(request.interactive, bool)):
            raise ExecProtocolError("exec tty and interactive must be true or false")
        if not (is_int(request.rows, 0, 0xFFFF) and is_int(request.cols, 0, 0xFFFF)):
            raise ExecProtocolError("exec rows and cols must be 0..65535")
        if not (isinstance(request.env, dict) and len(request.env) <= _MAX_ARGV
                and all(is_text(k, _MAX_WORD) and k and "=" not in k and is_text(v, _MAX_WORD)
                        for k, v in request.env.items())):
            raise ExecProtocolError("exec env must map variable names to strings")
        return request


def frame(kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def exit_frame(code: int) -> bytes:
    return frame(EXIT, str(code).encode())


def parse_exit(payload: bytes) -> int:
    """The exit code an EXIT frame carries (0..255), or ExecProtocolError."""
    if not (1 <= len(payload) <= 3 and payload.isdigit()) or int(payload) > 255:
        raise ExecProtocolError(f"exec exit frame {payload[:8]!r} is not a code 0..255")
    return int(payload)


def resize_frame(rows: int, cols: int) -> bytes:
    return frame(RESIZE, struct.pack(">HH", rows, cols))


def parse_resize(payload: bytes) -> tuple[int, int]:
    rows, cols = struct.unpack(">HH", payload)
    return rows, cols


def read_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next frame, or None at a clean end of stream."""
    try:
        header = read_exact(sock, _HEADER.size)
    except ShortRead as exc:
        if exc.received == 0:
            return None
        raise ExecProtocolError("exec stream ended inside a frame") from None
    kind, length = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ExecProtocolError(f"exec frame of {length} bytes exceeds {MAX_FRAME}")
    try:
        payload = read_exact(sock, length)
    except ShortRead:
        raise ExecProtocolError("exec stream ended inside a frame") from None
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
