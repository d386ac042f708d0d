"""The Connect protocol (connectrpc.com/docs/protocol) as envd's clients speak it: the JSON codec only, no
compression. Unary calls are a JSON body each way; a server stream is a sequence of 5-byte-prefixed envelopes
(`[flags u8][length u32 BE][JSON]`) ending with an end-of-stream envelope that carries the error, if any."""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeVar

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
_PREFIX = struct.Struct(">BI")
PREFIX_SIZE = _PREFIX.size
MAX_MESSAGE = 4 << 20  # envd's requests are small; a bigger envelope is a broken or hostile client
_MAX_TIMEOUT_DIGITS = 10  # the spec's limit on Connect-Timeout-Ms

UNARY_CONTENT_TYPE = "application/json"
STREAM_CONTENT_TYPE = "application/connect+json"
_T = TypeVar("_T")


class Code(StrEnum):
    """Connect error codes, with the HTTP status a unary error answers with."""

    CANCELED = "canceled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    Code.CANCELED: 499, Code.UNKNOWN: 500, Code.INVALID_ARGUMENT: 400, Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409, Code.PERMISSION_DENIED: 403, Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400, Code.ABORTED: 409, Code.OUT_OF_RANGE: 400, Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500, Code.UNAVAILABLE: 503, Code.DATA_LOSS: 500, Code.UNAUTHENTICATED: 401,
}


class ConnectError(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return _PREFIX.pack(flags, len(payload)) + payload


def end_stream(error: ConnectError | None = None) -> bytes:
    return envelope({"error": error.to_json()} if error else {}, FLAG_END_STREAM)


def split_envelopes(data: bytes) -> list[tuple[int, bytes]]:
    """Every (flags, payload) in `data`, which must hold whole envelopes only."""
    messages = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < PREFIX_SIZE:
            raise ConnectError(Code.INVALID_ARGUMENT, "the request ends inside an envelope prefix")
        flags, length = _PREFIX.unpack_from(data, offset)
        offset += PREFIX_SIZE
        if length > MAX_MESSAGE:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds {MAX_MESSAGE}")
        if len(data) - offset < length:
            raise ConnectError(Code.INVALID_ARGUMENT, "the request ends inside an envelope")
        messages.append((flags, data[offset:offset + length]))
        offset += length
    return messages


def stream_request(data: bytes) -> dict[str, Any]:
    """The one request message of a server-streaming call."""
    messages = split_envelopes(data)
    if len(messages) != 1:
        raise ConnectError(Code.INVALID_ARGUMENT, f"a server stream takes 1 request message, not {len(messages)}")
    flags, payload = messages[0]
    if flags & FLAG_COMPRESSED:
        raise ConnectError(Code.UNIMPLEMENTED, "compressed messages are not supported")
    if flags & FLAG_END_STREAM:
        raise ConnectError(Code.INVALID_ARGUMENT, "a request message cannot end the stream")
    return json_object(payload)


def json_object(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ConnectError(Code.INVALID_ARGUMENT, "the message is not JSON") from None
    if not isinstance(message, dict):
        raise ConnectError(Code.INVALID_ARGUMENT, "the message is not a JSON object")
    return message


def timeout_seconds(header: str | None) -> float | None:
    """Connect-Timeout-Ms: at most 10 digits of milliseconds."""
    if header is None:
        return None
    if not (0 < len(header) <= _MAX_TIMEOUT_DIGITS and header.isascii() and header.isdigit()):
        raise ConnectError(Code.INVALID_ARGUMENT, "Connect-Timeout-Ms must be 1 to 10 digits")
    return int(header) / 1000


# --- proto3 JSON mapping of the fields envd's messages use -------------------------------------------------

def field(message: dict[str, Any], camel: str, snake: str | None = None) -> Any:
    """A field by its JSON name or its proto name (proto3 JSON parsers accept both)."""
    if camel in message:
        return message[camel]
    return message.get(snake) if snake else None


def _checked(message: dict[str, Any], camel: str, snake: str | None, default: _T, fits: Callable[[Any], bool],
             must: str) -> _T:
    """A field's value if it `fits`, `default` when it is absent or null; else INVALID_ARGUMENT: "<camel> must ..."."""
    value = field(message, camel, snake)
    if value is None:
        return default
    if not fits(value):
        raise ConnectError(Code.INVALID_ARGUMENT, f"{camel} must {must}")
    return value


def text(message: dict[str, Any], camel: str, snake: str | None = None, *, default: str = "") -> str:
    return _checked(message, camel, snake, default, lambda v: isinstance(v, str), "be a string")


def integer(message: dict[str, Any], camel: str, snake: str | None = None, *, default: int = 0) -> int:
    """An integer field: a JSON number or, for 64-bit fields, a decimal string."""
    value = field(message, camel, snake)
    if value is None:
        return default
    if isinstance(value, str) and value.lstrip("-").isdigit() and len(value) <= 20:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConnectError(Code.INVALID_ARGUMENT, f"{camel} must be an integer")


def boolean(message: dict[str, Any], camel: str, *, default: bool = False) -> bool:
    return _checked(message, camel, None, default, lambda v: isinstance(v, bool), "be true or false")


def obj(message: dict[str, Any], camel: str) -> dict[str, Any]:
    return _checked(message, camel, None, {}, lambda v: isinstance(v, dict), "be an object")


def string_list(message: dict[str, Any], camel: str) -> list[str]:
    return _checked(message, camel, None, [], lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
                    "be a list of strings")


def string_map(message: dict[str, Any], camel: str) -> dict[str, str]:
    return _checked(message, camel, None, {},
                    lambda v: isinstance(v, dict) and all(isinstance(i, str) for i in v.values()),
                    "map strings to strings")


def enum(message: dict[str, Any], camel: str, names: dict[str, int]) -> int:
    """An enum field by name (`SIGNAL_SIGKILL`) or number."""
    value = message.get(camel, 0)
    if isinstance(value, str) and value in names:
        return names[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in names.values():
        return value
    raise ConnectError(Code.INVALID_ARGUMENT, f"{camel} has an unknown value")


def bytes_field(message: dict[str, Any], camel: str) -> bytes:
    value = _checked(message, camel, None, "", lambda v: isinstance(v, str), "be base64")
    try:  # proto3 JSON accepts standard and URL-safe base64, with or without padding
        return base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4),
                                validate=True)
    except (binascii.Error, ValueError):
        raise ConnectError(Code.INVALID_ARGUMENT, f"{camel} must be base64") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
