"""envd's processes, kept on the host: each command is one exec stream into the sandbox's container, started by
a small sh wrapper that reports the command's pid (as the container sees it) on stderr before anything else,
enters the working directory, falls back to /bin/sh where the image has no /bin/bash (the SDK always asks for
`/bin/bash -l -c CMD`) and switches user. Events go to every stream attached to the process (Start, Connect);
with none attached they are dropped, as envd drops them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fcvm.serve import connect as c
from fcvm.serve.backend import Backend, ExecStream, Machine
from fcvm_wire import exec_proto as ep

START = r"""echo "$$" >&2
cwd=$1 user=$2
shift 2
if [ -n "$cwd" ]; then cd -- "$cwd" || exit 1; fi
if [ "$1" = /bin/bash ] && [ ! -x /bin/bash ]; then shift; set -- /bin/sh "$@"; fi
if [ -n "$user" ] && [ "$user" != root ]; then exec su -s /bin/sh "$user" -c 'exec "$0" "$@"' "$@"; fi
exec "$@"
"""
_PID_LINE_MAX = 24
_EARLY_MAX = 1 << 20
_QUEUE = 64


class EventKind(StrEnum):
    DATA = "data"  # output on `stream` (exec_proto.STDOUT or STDERR)
    END = "end"  # the command exited
    LOST = "lost"  # the connection to the sandbox ended first


@dataclass(frozen=True)
class Event:
    kind: EventKind
    data: bytes = b""
    stream: int = ep.STDOUT
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        if self.kind == EventKind.DATA:
            return {"event": {"data": {"stdout" if self.stream == ep.STDOUT else "stderr": c.b64(self.data)}}}
        return {"event": {"end": {"exitCode": self.exit_code, "exited": True,
                                  "status": f"exit status {self.exit_code}"}}}


@dataclass
class Process:
    pid: int
    config: dict[str, Any]
    tag: str | None
    stream: ExecStream
    stdin: bool
    early: list[Event]
    subscribers: set[asyncio.Queue[Event]] = field(default_factory=set)
    pump: asyncio.Task[None] | None = None

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"config": self.config, "pid": self.pid}
        if self.tag is not None:
            info["tag"] = self.tag
        return info

    @contextlib.asynccontextmanager
    async def attached(self) -> AsyncIterator[asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue(_QUEUE)
        self.subscribers.add(queue)
        try:
            yield queue
        finally:
            self.subscribers.discard(queue)
            while not queue.empty():  # a pump blocked on this full queue goes on
                queue.get_nowait()


class ProcessTable:
    """The processes of one sandbox's current machine."""

    def __init__(self, backend: Backend, machine: Machine) -> None:
        self.backend = backend
        self.machine = machine
        self._processes: dict[int, Process] = {}

    def list(self) -> list[Process]:
        return list(self._processes.values())

    def find(self, selector: dict[str, Any]) -> Process:
        if "pid" in selector:
            pid = c.integer(selector, "pid")
            found = self._processes.get(pid)
        elif "tag" in selector:
            tag = c.text(selector, "tag")
            found = next((p for p in self._processes.values() if p.tag == tag), None)
        else:
            raise c.ConnectError(c.Code.INVALID_ARGUMENT, "select the process by pid or tag")
        if found is None:
            raise c.ConnectError(c.Code.NOT_FOUND, "process not found")
        return found

    async def start(self, config: dict[str, Any], env: dict[str, str], *, user: str, tag: str | None,
                    stdin: bool) -> Process:
        """Start a command and read its pid. Its events flow once `run` is called: attach first to miss none."""
        argv = ["/bin/sh", "-c", START, "fcvm", config.get("cwd", ""), user, config["cmd"], *config["args"]]
        stream = await self.backend.exec(self.machine, argv, env, stdin=stdin)
        try:
            pid, early = await _read_pid(stream)
        except BaseException:
            stream.close()
            raise
        process = Process(pid, config, tag, stream, stdin, early)
        self._processes[pid] = process
        return process

    def run(self, process: Process) -> None:
        if process.pump is None:
            process.pump = asyncio.create_task(self._pump(process))

    async def _pump(self, process: Process) -> None:
        for event in process.early:
            await self._publish(process, event)
        ended = Event(EventKind.LOST)
        try:
            while (frame := await process.stream.frame()) is not None:
                kind, payload = frame
                if kind == ep.EXIT:
                    ended = Event(EventKind.END, exit_code=ep.parse_exit(payload))
                    break
                if kind in (ep.STDOUT, ep.STDERR) and payload:
                    await self._publish(process, Event(EventKind.DATA, payload, kind))
        except (OSError, ep.ExecProtocolError):  # the guest is untrusted: a broken stream only ends the command
            pass
        finally:
            self._processes.pop(process.pid, None)
            process.stream.close()
        await self._publish(process, ended)

    @staticmethod
    async def _publish(process: Process, event: Event) -> None:
        for queue in list(process.subscribers):
            await queue.put(event)

    def close(self) -> None:
        """The machine is going away: every stream attached ends, every command is forgotten."""
        for process in list(self._processes.values()):
            process.stream.close()


async def _read_pid(stream: ExecStream) -> tuple[int, list[Event]]:
    """The pid line the wrapper writes first on stderr, and any event that came before or after it."""
    line = b""
    early: list[Event] = []
    while b"\n" not in line:
        frame = await stream.frame()
        if frame is None:
            raise c.ConnectError(c.Code.UNAVAILABLE, "the sandbox closed the connection before the command started")
        kind, payload = frame
        if kind == ep.STDERR:
            line += payload
            if len(line) > _PID_LINE_MAX and b"\n" not in line[:_PID_LINE_MAX]:
                break
        elif kind == ep.STDOUT and payload:
            early.append(Event(EventKind.DATA, payload, ep.STDOUT))
            if sum(len(e.data) for e in early) > _EARLY_MAX:  # the wrapper writes the pid first: a broken sandbox
                break
        elif kind == ep.EXIT:
            break
    head, _, rest = line.partition(b"\n")
    if not (head.isdigit() and 0 < len(head) <= 10 and int(head) < 1 << 32):
        detail = line.decode(errors="replace").strip()[-300:] or "no output"
        raise c.ConnectError(c.Code.INTERNAL, f"the command did not start: {detail}")
    if rest:
        early.append(Event(EventKind.DATA, rest, ep.STDERR))
    return int(head), early
