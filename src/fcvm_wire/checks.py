"""Checks shared by the wire decoders.

Every decoder is total: any input gives a value or the decoder's own error type, never ValueError, TypeError,
KeyError, AttributeError or RecursionError. The guest is untrusted, so the host decodes what it sends with these;
the guest decodes the host's messages the same way, so one set of rules serves both ends.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from enum import StrEnum
from typing import Any, TypeGuard, TypeVar

_Enum = TypeVar("_Enum", bound=StrEnum)

# How much of an untrusted value an error message shows.
_SHOWN_CHARS = 40
_SHOWN_INT_BITS = 64


def loads(data: str | bytes, error: type[Exception], what: str) -> object:
    """Parse JSON, raising `error` for anything that is not a JSON document this process can hold."""
    try:
        return json.loads(data)
    except RecursionError:  # "[[[[..." deeper than the interpreter's recursion limit
        raise error(f"{what} is nested too deeply") from None
    except ValueError as exc:
        # JSONDecodeError, UnicodeDecodeError, and an integer literal of more than 4300 digits (int()'s limit).
        # None of their messages quote the input, so they are safe to log.
        raise error(f"{what} is not valid JSON: {exc}") from None


def describe(value: object) -> str:
    """A short, printable rendering of an untrusted value for an error message.

    repr() escapes control and other non-printable characters, so the text cannot forge log lines or drive a
    terminal; an integer repr() would refuse (more than 4300 digits) is described by its size instead."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= _SHOWN_INT_BITS else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        shown = repr(value[:_SHOWN_CHARS])
        return shown + "..." if len(value) > _SHOWN_CHARS else shown
    return f"a {type(value).__name__}"  # containers may be huge, deeply nested or self-referencing


def printable(text: str) -> str:
    """`text` with every non-printable character (control characters, escape sequences, bidi overrides,
    newlines) shown as its Python escape: untrusted text made safe for one line of a log or a terminal."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def is_int(value: object, low: int, high: int) -> TypeGuard[int]:
    """An int (never a bool: True is an int to Python, not to the protocol) in low..high."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_text(value: object, max_chars: int, *, nul_ok: bool = False) -> TypeGuard[str]:
    """A str of at most `max_chars` characters that encodes to UTF-8, without NUL unless `nul_ok`.

    JSON can carry lone surrogates ("\\ud800"), which no file, terminal or argv accepts; argv, environment
    and paths cannot hold NUL."""
    if not isinstance(value, str) or len(value) > max_chars or (not nul_ok and "\0" in value):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def member(enum: type[_Enum], value: object) -> _Enum | None:
    """The member of `enum` whose value is `value`, or None."""
    if not isinstance(value, str):
        return None
    try:
        return enum(value)
    except ValueError:
        return None


def object_fields(data: object, cls: type[Any], error: type[Exception], what: str) -> dict[str, Any]:
    """`data` when it is a JSON object whose keys are the dataclass `cls`'s fields (none unknown, none without a
    default missing), so that `cls(**data)` cannot raise TypeError. The values are not checked: the caller
    validates them."""
    if not isinstance(data, dict):
        raise error(f"{what} must be a JSON object, not {describe(data)}")
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise error(f"{what} has an unknown field {describe(key)}")
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in data:
            raise error(f"{what} is missing {f.name!r}")
    return data
