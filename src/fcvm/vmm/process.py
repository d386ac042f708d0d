"""The one lifecycle of a VMM process, QEMU's and Firecracker's alike.

Start it (inside the VM's namespaces, in a session of its own unless told otherwise), re-log its stdout and
stderr line by line into the VM's console file and its `fcvm.vm.<name>` logger, remember the last lines for
error messages, and end it with SIGTERM, then SIGKILL, then its whole process group.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import IO, cast

from fcvm.core import log
from fcvm.core.bounded_log import BoundedLog
from fcvm.core.proc import Child, ProcessRef, spawn


class ConsoleSink:
    """The VM's console file, bounded (the guest decides how much it prints), remembering its last lines for
    error messages."""

    def __init__(self, path: Path, keep: int = 20) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._log = BoundedLog(path)
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self._log.write_line(line)
            if line:
                self.tail.append(line)
        return len(text)

    def flush(self) -> None:
        """Every line is written as it comes."""

    def close(self) -> None:
        self._log.close()

    def summary(self, lines: int = 3) -> str:
        recent = list(self.tail)[-lines:]
        return "; ".join(recent) if recent else "no output"


@dataclass(eq=False, repr=False)  # no repr: `env` may hold secrets
class VmmProcess:
    argv: Sequence[str]
    _: KW_ONLY
    console: Path
    logger: logging.Logger
    own_group: bool = True
    level: int = logging.DEBUG
    transform: Callable[[str], str] | None = None
    env: dict[str, str] | None = None
    pass_fds: Sequence[int] = ()  # what the VMM inherits (files it could not open itself)
    sink: ConsoleSink | None = field(default=None, init=False)
    _child: Child | None = field(default=None, init=False)
    _relog: threading.Thread | None = field(default=None, init=False)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, init=False)

    def __post_init__(self) -> None:
        self.argv, self.pass_fds = list(self.argv), tuple(self.pass_fds)  # the caller's, as they were at the call

    def start(self) -> Child:
        self.logger.debug("starting %s", " ".join(self.argv))
        self.sink = self._stack.enter_context(contextlib.closing(ConsoleSink(self.console)))
        # The caller's working directory: every path fcvm passes is absolute, and a relative one the user put in
        # the environment (FCVM_FC_SPEC=../shared/... for fc-mock) keeps meaning what they typed.
        child = self._child = self._stack.enter_context(spawn(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, own_group=self.own_group, env=self.env,
            pass_fds=self.pass_fds,
        ))
        assert child.popen.stdout is not None
        self._relog = log.relog_in_thread(child.popen.stdout, self.logger, level=self.level,
                                          transform=self.transform, sink=cast(IO[str], self.sink))
        return child

    @property
    def child(self) -> Child | None:
        return self._child

    @property
    def ref(self) -> ProcessRef | None:
        return self._child.ref if self._child else None

    def exited(self) -> bool:
        return self._child is None or self._child.exited()

    def wait(self, timeout: float | None = None) -> int | None:
        if self._child is None:
            return None
        code = self._child.wait(timeout)
        if code is not None and self._relog is not None:
            self._relog.join(timeout=5)  # the last lines reach the console file before anyone reads it
        return code

    def output(self) -> str:
        """The last lines it printed, for an error message."""
        if self._relog is not None and self.exited():
            self._relog.join(timeout=2)
        return self.sink.summary() if self.sink else "no output"

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, SIGKILL after `grace`, its group, the zombie; then the console file. Idempotent."""
        if self._child is not None:
            self._child.stop(grace)
            if self._relog is not None:
                self._relog.join(timeout=5)
        self._stack.close()
