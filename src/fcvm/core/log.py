"""Logging: hierarchical `fcvm.*` loggers, colour only on a TTY, child output re-logged per line.

`FCVM_LOG=debug` (or `--log-level`) sets the level. Loggers are named by target:
`fcvm.vm.<name>`, `fcvm.net`, `fcvm.uffd`, `fcvm.fusepipe`, `fcvm.state`, ...
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    import threading
    from typing import IO

LEVEL_ENV = "FCVM_LOG"
# logging's level numbers, known without importing logging: a command that never logs (`fcvm ls` with nothing
# to reap) never pays for it (about 7 ms at every start).
_LEVELS = {"CRITICAL": 50, "FATAL": 50, "ERROR": 40, "WARNING": 30, "WARN": 30, "INFO": 20, "DEBUG": 10, "NOTSET": 0}
_COLOURS = {
    _LEVELS["DEBUG"]: "\x1b[2m",
    _LEVELS["INFO"]: "\x1b[36m",
    _LEVELS["WARNING"]: "\x1b[33m",
    _LEVELS["ERROR"]: "\x1b[31m",
    _LEVELS["CRITICAL"]: "\x1b[1;31m",
}
_RESET = "\x1b[0m"
MAX_LINE = 64 << 10  # longer lines of a child's output are re-logged in pieces
_pending: tuple[int, IO[str]] | None = None


def setup(level: str | None = None, stream: IO[str] | None = None) -> None:
    """Configure the `fcvm` and `fc_agent` logger trees once per process.

    Applied at once when logging is already imported (a logger exists), else when `get` first hands one out."""
    global _pending
    given = level or os.environ.get(LEVEL_ENV) or "info"
    if given.upper() not in _LEVELS:
        raise ValueError(f"unknown log level {given!r}: use debug, info, warning or error")
    _pending = (_LEVELS[given.upper()], stream or sys.stderr)
    if "logging" in sys.modules:
        _apply()


def _apply() -> None:
    """Carry out the pending `setup`, if any."""
    global _pending
    import logging

    if _pending is None:
        return
    numeric, stream = _pending
    _pending = None

    class Formatter(logging.Formatter):
        def __init__(self, colour: bool) -> None:
            super().__init__()
            self.colour = colour

        def format(self, record: logging.LogRecord) -> str:
            target = record.name.removeprefix("fcvm.") if record.name != "fcvm" else "fcvm"
            level = record.levelname.lower()
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                # The exception in one line always; its traceback at debug level (FCVM_LOG=debug).
                message += f": {record.exc_info[1]!r}"
                if numeric <= logging.DEBUG:
                    message += "\n" + self.formatException(record.exc_info)
            if self.colour:
                colour = _COLOURS.get(record.levelno, "")
                return f"{colour}{level:>7}{_RESET} \x1b[2m{target}\x1b[0m {message}"
            return f"{level:>7} {target} {message}"

    handler = logging.StreamHandler(stream)
    handler.setFormatter(Formatter(colour=stream.isatty()))
    for root_name in ("fcvm", "fc_agent"):
        root = logging.getLogger(root_name)
        root.handlers[:] = [handler]
        root.setLevel(numeric)
        root.propagate = False


def get(target: str) -> logging.Logger:
    """`get("vm.web")` returns the `fcvm.vm.web` logger."""
    import logging

    _apply()
    return logging.getLogger(f"fcvm.{target}" if target else "fcvm")


# Firecracker prefixes each line with a timestamp and `[anonymous-instance:main]` or `[<id>:<thread>]`. Patterns,
# compiled (and cached by re) at first use: compiling them at import would cost every fcvm command 0.3 ms.
_FIRECRACKER_PREFIX = r"^(?:\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?\s*)?(?:\[[^\]\s]+:[^\]]+\]\s*)?"
_LEVEL_WORD = r"^(ERROR|WARN|INFO|DEBUG|TRACE)\s+"


def strip_vmm_prefix(line: str) -> str:
    """Drop Firecracker's timestamp and instance prefix, keep the message."""
    stripped = re.sub(_FIRECRACKER_PREFIX, "", line, count=1)
    return re.sub(_LEVEL_WORD, "", stripped, count=1)


def relog_lines(
    lines: Iterable[bytes | str],
    logger: logging.Logger,
    *,
    level: int = _LEVELS["INFO"],
    transform: Callable[[str], str] | None = None,
    sink: IO[str] | None = None,
) -> None:
    """Re-log child output one line at a time; also append each line to `sink` (the VM log)."""
    for raw in lines:
        line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if transform:
            line = transform(line)
        if not line:
            continue
        if sink is not None:
            sink.write(line + "\n")
            sink.flush()
        logger.log(level, "%s", line)


def relog_in_thread(
    stream: IO[bytes],
    logger: logging.Logger,
    *,
    level: int = _LEVELS["INFO"],
    transform: Callable[[str], str] | None = None,
    sink: IO[str] | None = None,
) -> threading.Thread:
    import threading

    thread = threading.Thread(
        target=relog_lines,
        # A bounded readline: a guest printing without a newline would otherwise grow one line in host memory.
        args=(iter(lambda: stream.readline(MAX_LINE), b""), logger),
        kwargs={"level": level, "transform": transform, "sink": sink},
        name=f"relog-{logger.name}",
        daemon=True,
    )
    thread.start()
    return thread
