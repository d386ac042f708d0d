"""The agent's control stream (guest -> host port HOST_CONTROL): newline-delimited JSON messages.

host -> guest: {"type": "prepare", "plan": {...}} (QEMU; under Firecracker it comes from MMDS): the image and
                   the network only, nothing of the run: the agent loads the image, warms podman, says `prepared`
               {"type": "plan", "plan": {...}}: the run's plan, once the agent is prepared
               {"type": "restore", "time": HOST_WALL_CLOCK}: answers the hello of an agent woken up in a snapshot
               {"type": "shutdown", "timeout": SECONDS}
guest -> host: {"type": "hello", "agent": VERSION, "epoch": N}
               {"type": "restored", "epoch": N}: the clock is set and the neighbours flushed; N restores so far
               {"type": "status", "state": "starting|prepared|running|exited|failed", "exit_code": N|null,
                "detail": "..."}
               {"type": "health", "health": "healthy|unhealthy|starting"}
               {"type": "log", "stream": "stdout|stderr|agent", "line": "..."}

Each message is a frozen dataclass that checks its fields when built, so neither end can send what the other would
refuse; `decode()` turns any line into one of them or raises ControlError.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from fcvm_wire.checks import describe, is_int, is_text, loads, member, object_fields
from fcvm_wire.plan import Plan, PlanError

MAX_LINE = 1 << 20
MAX_LOG_LINE = 64 * 1024  # characters; the agent splits longer container output lines
MAX_DETAIL = 8 * 1024  # characters of a failure's description
MAX_AGENT_VERSION = 64
MAX_SHUTDOWN_TIMEOUT = 3600
_MAX_EPOCH = 2**63 - 1
_Enum = TypeVar("_Enum", bound=StrEnum)


class ControlError(Exception):
    """A control message is malformed. The message never quotes untrusted text unescaped."""


class ContainerState(StrEnum):
    """Where the container is: `exited` carries its exit code, `failed` says why it never ran (or was lost)."""

    STARTING = "starting"
    PREPARED = "prepared"  # the image is loaded and podman warm; waiting for the run's plan
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"


class HealthState(StrEnum):
    """The result of the container's own health check, run by the agent; `starting` until the first one."""

    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class LogStream(StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"
    AGENT = "agent"  # the agent's own log, not the container's output


class _Message:
    """What every message shares: the `type` it travels under and its line on the wire. Subclasses are frozen
    dataclasses whose __post_init__ checks their fields, raising ControlError."""

    TYPE: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def encode(self) -> bytes:
        return json.dumps({"type": self.TYPE, **asdict(self)}, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True)
class Hello(_Message):
    TYPE: ClassVar[str] = "hello"
    agent: str
    epoch: int

    def __post_init__(self) -> None:
        _check(is_text(self.agent, MAX_AGENT_VERSION), "hello.agent must be a short string")
        _check(is_int(self.epoch, 0, _MAX_EPOCH), f"hello.epoch {describe(self.epoch)} is out of range")


@dataclass(frozen=True)
class _CarriesPlan(_Message):
    plan: Plan

    def __post_init__(self) -> None:
        _check(isinstance(self.plan, Plan), f"{self.TYPE}.plan must be a plan")
        try:
            self.plan.validate()
        except PlanError as exc:
            raise ControlError(f"bad plan: {exc}") from None


@dataclass(frozen=True)
class PrepareMessage(_CarriesPlan):
    """The part of the plan that is the same for every run of an image: what a pre-start snapshot may hold."""

    TYPE: ClassVar[str] = "prepare"


@dataclass(frozen=True)
class PlanMessage(_CarriesPlan):
    TYPE: ClassVar[str] = "plan"


@dataclass(frozen=True)
class Restore(_Message):
    """You woke up in a snapshot: here is the wall clock."""

    TYPE: ClassVar[str] = "restore"
    time: float

    def __post_init__(self) -> None:
        _check(isinstance(self.time, (int, float)) and not isinstance(self.time, bool) and 0 < self.time < 2**40,
               f"restore.time {describe(self.time)} is not a wall-clock time")


@dataclass(frozen=True)
class Restored(_Message):
    TYPE: ClassVar[str] = "restored"
    epoch: int

    def __post_init__(self) -> None:
        _check(is_int(self.epoch, 0, _MAX_EPOCH), f"restored.epoch {describe(self.epoch)} is out of range")


@dataclass(frozen=True)
class Shutdown(_Message):
    """Stop the container like `podman stop --time TIMEOUT`."""

    TYPE: ClassVar[str] = "shutdown"
    timeout: int

    def __post_init__(self) -> None:
        _check(is_int(self.timeout, 0, MAX_SHUTDOWN_TIMEOUT),
               f"shutdown.timeout {describe(self.timeout)} is not 0..{MAX_SHUTDOWN_TIMEOUT}")


@dataclass(frozen=True)
class Status(_Message):
    """Where the container is. `exit_code` is set exactly when it has exited."""

    TYPE: ClassVar[str] = "status"
    state: ContainerState
    exit_code: int | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", _member(ContainerState, self.state, "status.state"))
        if self.state == ContainerState.EXITED:
            _check(is_int(self.exit_code, 0, 255), f"status.exit_code {describe(self.exit_code)} is not 0..255")
        else:
            _check(self.exit_code is None, f"status.exit_code must be null while {self.state}")
        _check(is_text(self.detail, MAX_DETAIL, nul_ok=True),
               f"status.detail must be text of at most {MAX_DETAIL} characters")


@dataclass(frozen=True)
class HealthReport(_Message):
    TYPE: ClassVar[str] = "health"
    health: HealthState

    def __post_init__(self) -> None:
        object.__setattr__(self, "health", _member(HealthState, self.health, "health.health"))


@dataclass(frozen=True)
class Log(_Message):
    """One line of the container's output or of the agent's log (without its newline)."""

    TYPE: ClassVar[str] = "log"
    stream: LogStream
    line: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "stream", _member(LogStream, self.stream, "log.stream"))
        _check(is_text(self.line, MAX_LOG_LINE, nul_ok=True),
               f"log.line must be text of at most {MAX_LOG_LINE} characters")


Message = Hello | PrepareMessage | PlanMessage | Restore | Restored | Shutdown | Status | HealthReport | Log
_BY_TYPE: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, PrepareMessage, PlanMessage, Restore, Restored, Shutdown, Status, HealthReport, Log)
}


def fit_text(text: str, limit: int) -> str:
    """`text` made fit for a message field of `limit` characters: what UTF-8 cannot carry (lone surrogates, as in
    undecodable file names) becomes backslash escapes, and anything past `limit` is cut."""
    return text.encode(errors="backslashreplace").decode()[:limit]


def log_messages(stream: LogStream, line: str) -> list[Log]:
    """`line` as Log messages: one, or several when it is longer than MAX_LOG_LINE."""
    line = line.encode(errors="backslashreplace").decode()
    return [Log(stream, line[start:start + MAX_LOG_LINE]) for start in range(0, max(len(line), 1), MAX_LOG_LINE)]


def decode(line: bytes) -> Message:
    """The message on one line, or ControlError: total for any bytes."""
    data = loads(line, ControlError, "control message")
    if not isinstance(data, dict):
        raise ControlError(f"control message must be a JSON object, not {describe(data)}")
    kind = data.pop("type", None)
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ControlError(f"unknown control message type {describe(kind)}")
    fields = object_fields(data, cls, ControlError, f"{kind} message")
    if cls is PlanMessage or cls is PrepareMessage:
        try:
            return cls(Plan.from_dict(fields["plan"]))
        except PlanError as exc:
            raise ControlError(f"bad plan: {exc}") from None
    return cls(**fields)


class ControlStream:
    """A control connection: thread-safe send, and receive from one thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb")
        self._send_lock = threading.Lock()

    def send(self, message: Message) -> None:
        data = message.encode()
        with self._send_lock:
            self.sock.sendall(data)

    def receive(self) -> Message | None:
        """The next message, or None at the end of the stream. A bad line raises ControlError and is consumed
        whole, so the stream stays usable."""
        line = self._reader.readline(MAX_LINE)
        if not line:
            return None
        if not line.endswith(b"\n"):
            if len(line) < MAX_LINE:
                raise ControlError("the control stream ended inside a line")
            while line and not line.endswith(b"\n"):
                line = self._reader.readline(MAX_LINE)
            raise ControlError(f"control line longer than {MAX_LINE} bytes")
        return decode(line)

    def close(self) -> None:
        self._reader.close()
        self.sock.close()


def _member(enum: type[_Enum], value: object, what: str) -> _Enum:
    found = member(enum, value)
    if found is None:
        raise ControlError(f"{what} {describe(value)} is not one of {', '.join(enum)}")
    return found


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ControlError(message)
