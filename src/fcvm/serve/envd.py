"""The data plane: envd's RPCs (process.Process, filesystem.Filesystem) and its HTTP routes (/files, /health),
answered on the host and carried into the sandbox's container as exec streams."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import posixpath
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import BodyPartReader, web

from fcvm.serve import connect as c
from fcvm.serve import files
from fcvm.serve.backend import Backend, Machine
from fcvm.serve.process import Event, EventKind, Process, ProcessTable
from fcvm.serve.sandboxes import Sandbox
from fcvm_wire import exec_proto as ep

ENVD_VERSION = "0.5.7"  # what is implemented: Start/Connect/stdin/CloseStdin, the small filesystem RPCs, octet-stream
ENVD_PORT = 49983
_SIGNALS = {"SIGNAL_UNSPECIFIED": 0, "SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEFAULT_KEEPALIVE = 90.0  # envd's, when the client names none
_MAX_RPC_BODY = c.MAX_MESSAGE
_MAX_LISTING = 64 << 20
_UPLOAD_CHUNK = 256 << 10  # under exec_proto.MAX_FRAME
_SIGNATURE_PREFIX = "v1_"

Handler = Callable[[web.Request, Sandbox], Awaitable[web.StreamResponse]]


def valid_env_name(name: str) -> bool:
    return _ENV_NAME.fullmatch(name) is not None


def check_env(env: dict[str, str]) -> dict[str, str]:
    bad = next((name for name in env if not valid_env_name(name)), None)
    if bad is not None:
        raise c.ConnectError(c.Code.INVALID_ARGUMENT, f"invalid environment variable name {bad[:64]!r}")
    return env


def request_user(request: web.Request, query_user: str | None = None) -> str:
    """The user a call runs as: HTTP Basic `user:` (RPCs) or `username=` (/files); root when none is named."""
    if query_user:
        return query_user
    header = request.headers.get("Authorization", "")
    if header.startswith("Basic "):
        try:
            user = base64.b64decode(header[6:], validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            raise c.ConnectError(c.Code.INVALID_ARGUMENT, "malformed Authorization header") from None
        return user
    return ""


def _check_user(user: str) -> str:
    if user and not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}\$?", user):
        raise c.ConnectError(c.Code.INVALID_ARGUMENT, f"invalid user name {user[:40]!r}")
    return user


def valid_signature(token: str, path: str, operation: str, user: str, signature: str, expiration: str | None) -> bool:
    """The SDK's v1 file-URL signature: sha256 of path:operation:user:token[:expiration], base64 without '='."""
    if expiration is not None and (not expiration.isdigit() or int(expiration) < time.time()):
        return False
    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiration}" if expiration is not None else "")
    digest = base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode()
    return hmac.compare_digest(f"{_SIGNATURE_PREFIX}{digest}", signature)


def _script_argv(script: str, args: list[str], user: str) -> list[str]:
    if user and user != "root":
        return ["su", "-s", "/bin/sh", user, "-c", script, "fcvm", *args]
    return ["/bin/sh", "-c", script, "fcvm", *args]


async def run_script(backend: Backend, machine: Machine, script: str, args: list[str], *, user: str = "",
                     limit: int = _MAX_LISTING) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, stderr) of a file script, its output bounded by `limit`."""
    stream = await backend.exec(machine, _script_argv(script, args, user), {}, stdin=False)
    out, err = bytearray(), bytearray()
    try:
        while (frame := await stream.frame()) is not None:
            kind, payload = frame
            if kind == ep.EXIT:
                return ep.parse_exit(payload), bytes(out), bytes(err)
            target = out if kind == ep.STDOUT else err if kind == ep.STDERR else None
            if target is not None:
                target += payload
                if len(out) + len(err) > limit:
                    raise c.ConnectError(c.Code.RESOURCE_EXHAUSTED, f"the answer exceeds {limit} bytes")
    except ep.ExecProtocolError as exc:
        raise c.ConnectError(c.Code.INTERNAL, f"the sandbox broke the exec protocol: {exc}") from None
    finally:
        stream.close()
    raise c.ConnectError(c.Code.UNAVAILABLE, "the connection to the sandbox ended before the call did")


class Envd:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/process.Process/Start"): self.start,
            ("POST", "/process.Process/Connect"): self.connect,
            ("POST", "/process.Process/List"): self.list_processes,
            ("POST", "/process.Process/SendInput"): self.send_input,
            ("POST", "/process.Process/CloseStdin"): self.close_stdin,
            ("POST", "/process.Process/SendSignal"): self.send_signal,
            ("POST", "/filesystem.Filesystem/Stat"): self.stat,
            ("POST", "/filesystem.Filesystem/ListDir"): self.list_dir,
            ("POST", "/filesystem.Filesystem/MakeDir"): self.make_dir,
            ("POST", "/filesystem.Filesystem/Move"): self.move,
            ("POST", "/filesystem.Filesystem/Remove"): self.remove,
            ("GET", "/files"): self.read_file,
            ("POST", "/files"): self.write_file,
            ("GET", "/health"): self.health,
        }

    # --- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _machine(sandbox: Sandbox) -> tuple[Machine, ProcessTable]:
        if sandbox.machine is None or sandbox.processes is None:
            raise c.ConnectError(c.Code.UNAVAILABLE, f"sandbox {sandbox.id} is paused")
        return sandbox.machine, sandbox.processes

    @staticmethod
    async def _unary_body(request: web.Request) -> dict[str, Any]:
        body = await read_body(request, _MAX_RPC_BODY)
        if body is None:
            raise c.ConnectError(c.Code.RESOURCE_EXHAUSTED, "request too large")
        if request.content_type == c.STREAM_CONTENT_TYPE:
            return c.stream_request(body)
        return c.json_object(body)

    @staticmethod
    def _unary(message: dict[str, Any]) -> web.Response:
        return web.json_response(message)

    # --- process.Process -------------------------------------------------------------------------

    async def start(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        message = await self._unary_body(request)
        deadline = c.timeout_seconds(request.headers.get("Connect-Timeout-Ms"))
        config = c.obj(message, "process")
        if message.get("pty"):
            raise c.ConnectError(c.Code.UNIMPLEMENTED, "fcvm: pseudo-terminals are not implemented")
        cmd = c.text(config, "cmd")
        if not cmd:
            raise c.ConnectError(c.Code.INVALID_ARGUMENT, "process.cmd is required")
        envs = check_env(c.string_map(config, "envs"))
        process_config: dict[str, Any] = {"cmd": cmd, "args": c.string_list(config, "args"), "envs": envs}
        if c.field(config, "cwd") is not None:
            process_config["cwd"] = c.text(config, "cwd")
        tag = c.text(message, "tag") if message.get("tag") is not None else None
        user = _check_user(request_user(request))
        _, table = self._machine(sandbox)
        response = await self._open_stream(request)
        try:
            process = await table.start(process_config, {**sandbox.envs, **envs}, user=user, tag=tag,
                                        stdin=c.boolean(message, "stdin", default=True))
        except c.ConnectError as exc:
            await response.write(c.end_stream(exc))
            return response
        except (OSError, ep.ExecProtocolError) as exc:  # the sandbox, not the client: the stream says so
            await response.write(c.end_stream(c.ConnectError(c.Code.UNAVAILABLE, f"the command did not start: {exc}")))
            return response
        async with process.attached() as queue:
            table.run(process)
            await response.write(c.envelope({"event": {"start": {"pid": process.pid}}}))
            await self._relay(request, response, queue, deadline)
        return response

    async def connect(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        message = await self._unary_body(request)
        deadline = c.timeout_seconds(request.headers.get("Connect-Timeout-Ms"))
        _, table = self._machine(sandbox)
        process = table.find(c.obj(message, "process"))
        response = await self._open_stream(request)
        async with process.attached() as queue:
            await response.write(c.envelope({"event": {"start": {"pid": process.pid}}}))
            await self._relay(request, response, queue, deadline)
        return response

    @staticmethod
    async def _open_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": c.STREAM_CONTENT_TYPE})
        await response.prepare(request)
        return response

    @staticmethod
    async def _relay(request: web.Request, response: web.StreamResponse, queue: asyncio.Queue[Event],
                     deadline: float | None) -> None:
        """Events to the stream until the command ends, with keepalives in between, and the deadline kept."""
        loop = asyncio.get_running_loop()
        interval = _keepalive_interval(request)
        ends = loop.time() + deadline if deadline is not None else None
        while True:
            wait = interval if ends is None else min(interval, ends - loop.time())
            if wait <= 0:
                await response.write(c.end_stream(c.ConnectError(c.Code.DEADLINE_EXCEEDED, "the call timed out")))
                return
            try:
                event = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                if ends is None or loop.time() < ends:
                    await response.write(c.envelope({"event": {"keepalive": {}}}))
                continue
            if event.kind == EventKind.LOST:
                await response.write(c.end_stream(c.ConnectError(
                    c.Code.UNAVAILABLE, "the connection to the sandbox ended before the command did")))
                return
            await response.write(c.envelope(event.to_json()))
            if event.kind == EventKind.END:
                await response.write(c.end_stream())
                return

    async def list_processes(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        await self._unary_body(request)
        _, table = self._machine(sandbox)
        return self._unary({"processes": [p.info() for p in table.list()]})

    def _process(self, sandbox: Sandbox, message: dict[str, Any]) -> Process:
        _, table = self._machine(sandbox)
        return table.find(c.obj(message, "process"))

    async def send_input(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        message = await self._unary_body(request)
        process = self._process(sandbox, message)
        data = c.obj(message, "input")
        if "pty" in data:
            raise c.ConnectError(c.Code.UNIMPLEMENTED, "fcvm: pseudo-terminals are not implemented")
        return await self._to_stdin(process, lambda: process.stream.send_stdin(c.bytes_field(data, "stdin")))

    async def close_stdin(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        message = await self._unary_body(request)
        process = self._process(sandbox, message)
        return await self._to_stdin(process, process.stream.close_stdin)

    async def _to_stdin(self, process: Process, write: Callable[[], Awaitable[None]]) -> web.StreamResponse:
        """Do `write` to the command's stdin: refused when it was started without one, NOT_FOUND once it ended."""
        if not process.stdin:
            raise c.ConnectError(c.Code.FAILED_PRECONDITION, "the command was started without stdin")
        try:
            await write()
        except OSError:
            raise c.ConnectError(c.Code.NOT_FOUND, "the command has ended") from None
        return self._unary({})

    async def send_signal(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        message = await self._unary_body(request)
        process = self._process(sandbox, message)
        signum = c.enum(message, "signal", _SIGNALS)
        if not signum:
            raise c.ConnectError(c.Code.INVALID_ARGUMENT, "name a signal: SIGTERM or SIGKILL")
        machine, _ = self._machine(sandbox)
        await self.backend.signal(machine, process.stream.group, signum)
        return self._unary({})

    # --- filesystem.Filesystem -------------------------------------------------------------------

    async def _script(self, request: web.Request, sandbox: Sandbox, script: str, args: list[str],
                      path: str) -> bytes:
        machine, _ = self._machine(sandbox)
        code, out, err = await run_script(self.backend, machine, script, args,
                                          user=_check_user(request_user(request)))
        if code != 0:
            raise files.error_for(code, path, err)
        return out

    @staticmethod
    def _path(message: dict[str, Any], name: str = "path") -> str:
        path = c.text(message, name)
        if not path:
            raise c.ConnectError(c.Code.INVALID_ARGUMENT, f"{name} is required")
        return path

    async def _entry_after(self, request: web.Request, sandbox: Sandbox, script: str) -> web.StreamResponse:
        """Run `script` on the request's path; answer with the entry there."""
        path = self._path(await self._unary_body(request))
        out = await self._script(request, sandbox, script, [path], path)
        return self._unary({"entry": files.one_entry(out, path)})

    async def stat(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        return await self._entry_after(request, sandbox, files.STAT)

    async def list_dir(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        message = await self._unary_body(request)
        path = self._path(message)
        depth = c.integer(message, "depth") or 1
        if not 1 <= depth <= 1024:
            raise c.ConnectError(c.Code.INVALID_ARGUMENT, "depth must be 1 to 1024")
        find_path = path if path.startswith("/") else f"./{path}"
        out = await self._script(request, sandbox, files.LIST_DIR, [find_path, str(depth)], path)
        return self._unary({"entries": list(files.entries(out))})

    async def make_dir(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        return await self._entry_after(request, sandbox, files.MAKE_DIR)

    async def move(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        message = await self._unary_body(request)
        source, destination = self._path(message, "source"), self._path(message, "destination")
        out = await self._script(request, sandbox, files.MOVE, [source, destination], source)
        return self._unary({"entry": files.one_entry(out, destination)})

    async def remove(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        path = self._path(await self._unary_body(request))
        await self._script(request, sandbox, files.REMOVE, [path], path)
        return self._unary({})

    # --- HTTP: /files and /health ----------------------------------------------------------------

    async def health(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        return web.Response(status=204)

    @staticmethod
    def file_error(status: int, message: str) -> web.Response:
        return web.json_response({"code": status, "message": message}, status=status)

    def _file_status(self, code: int, path: str, stderr: bytes) -> web.Response:
        error = files.error_for(code, path, stderr)
        status = {c.Code.NOT_FOUND: 404, c.Code.INVALID_ARGUMENT: 400}.get(error.code, 500)
        return self.file_error(status, error.message)

    async def read_file(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        path = request.query.get("path", "")
        if not path:
            return self.file_error(400, "the path parameter is required")
        machine, _ = self._machine(sandbox)
        user = _check_user(request.query.get("username", ""))
        stream = await self.backend.exec(machine, _script_argv(files.READ, [path], user), {}, stdin=False)
        stderr = bytearray()
        response: web.StreamResponse | None = None
        try:
            while (frame := await stream.frame()) is not None:
                kind, payload = frame
                if kind == ep.STDERR:
                    _keep_some(stderr, payload)
                elif kind == ep.STDOUT and payload:
                    if response is None:
                        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                        await response.prepare(request)
                    await response.write(payload)
                elif kind == ep.EXIT:
                    code = ep.parse_exit(payload)
                    if response is None:
                        return web.Response(body=b"", content_type="application/octet-stream") if code == 0 \
                            else self._file_status(code, path, bytes(stderr))
                    if code != 0:  # too late for a status: a cut-off body tells the client it failed
                        _abort(request)
                    return response
        except ep.ExecProtocolError:
            pass
        finally:
            stream.close()
        if response is None:
            return self.file_error(502, f"the connection to sandbox {sandbox.id} ended")
        _abort(request)
        return response

    async def write_file(self, request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
        machine, _ = self._machine(sandbox)
        user = _check_user(request.query.get("username", ""))
        path_param = request.query.get("path", "")
        written = []
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or part.name != "file":
                    continue
                path = path_param or part.filename or ""
                if not path:
                    return self.file_error(400, "a file part needs a path (its filename)")
                failure = await self._upload(machine, path, user, _part_chunks(part))
                if failure is not None:
                    return failure
                written.append(path)
        else:
            if not path_param:
                return self.file_error(400, "the path parameter is required")
            failure = await self._upload(machine, path_param, user, request.content.iter_chunked(_UPLOAD_CHUNK))
            if failure is not None:
                return failure
            written.append(path_param)
        if not written:
            return self.file_error(400, "no file in the request")
        return web.Response(text=json.dumps([{"path": p, "name": posixpath.basename(p), "type": "file"}
                                             for p in written]), content_type="application/json")

    async def _upload(self, machine: Machine, path: str, user: str,
                      chunks: AsyncIterator[bytes]) -> web.Response | None:
        stream = await self.backend.exec(machine, _script_argv(files.WRITE, [path], user), {}, stdin=True)
        stderr = bytearray()
        try:
            try:
                async for chunk in chunks:
                    for offset in range(0, len(chunk), _UPLOAD_CHUNK):
                        await stream.send_stdin(chunk[offset:offset + _UPLOAD_CHUNK])
                await stream.close_stdin()
            except OSError:  # the script ended early (a directory at the path, say): its exit code says why
                pass
            while (frame := await stream.frame()) is not None:
                kind, payload = frame
                if kind == ep.STDERR:
                    _keep_some(stderr, payload)
                elif kind == ep.EXIT:
                    code = ep.parse_exit(payload)
                    return None if code == 0 else self._file_status(code, path, bytes(stderr))
        except (OSError, ep.ExecProtocolError):
            pass
        finally:
            stream.close()
        return self.file_error(502, "the connection to the sandbox ended during the upload")


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole request body, or None when it is longer than `limit`."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _keep_some(buffer: bytearray, data: bytes, limit: int = 4096) -> None:
    """What a script said on stderr, for the error message: its first bytes only (the sandbox is untrusted)."""
    buffer += data[:max(0, limit - len(buffer))]


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(_UPLOAD_CHUNK):
        yield chunk


def _keepalive_interval(request: web.Request) -> float:
    header = request.headers.get("Keepalive-Ping-Interval", "")
    if header.isdigit() and 0 < int(header) <= 3600:
        return float(header)
    return _DEFAULT_KEEPALIVE
