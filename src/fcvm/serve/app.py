"""One HTTP/1.1 origin for both planes, as E2B's own proxy routes on localhost: a request that names a sandbox
(`E2b-Sandbox-Id`, `E2b-Sandbox-Port`) goes to that sandbox's envd, everything else is the control plane.
The control plane takes the API key (`X-API-KEY`); each sandbox's data plane its own access token. A route that
is not implemented answers 501 naming it."""

from __future__ import annotations

import hmac
import re
from collections.abc import AsyncIterator

from aiohttp import web

from fcvm.core import log
from fcvm.serve import connect as c
from fcvm.serve.control import ControlPlane
from fcvm.serve.envd import ENVD_PORT, Envd, valid_signature
from fcvm.serve.sandboxes import Sandbox, SandboxError, Sandboxes, SandboxState

_log = log.get("serve")

SANDBOX_HEADER = "E2b-Sandbox-Id"
PORT_HEADER = "E2b-Sandbox-Port"
_STREAMS = frozenset({"/process.Process/Start", "/process.Process/Connect"})
_UNAUTHENTICATED_DATA = frozenset({("GET", "/health")})
_FILES = "/files"


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$")


class Server:
    def __init__(self, sandboxes: Sandboxes, api_key: str) -> None:
        self.sandboxes = sandboxes
        self.api_key = api_key
        self.control = ControlPlane(sandboxes)
        self.envd = Envd(sandboxes.backend)
        self._control_routes = [(method, _pattern(path), handler) for method, path, handler in self.control.routes]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self.sandboxes.start_reaper()
        yield
        await self.sandboxes.shutdown()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            if SANDBOX_HEADER in request.headers:
                return await self._data_plane(request)
            return await self._control_plane(request)
        except web.HTTPException:
            raise
        except ConnectionError:  # the client went away mid-stream
            raise
        except Exception:
            _log.exception("%s %s failed", request.method, request.path)
            return web.json_response({"code": 500, "message": "internal error"}, status=500)

    # --- control plane ---------------------------------------------------------------------------

    async def _control_plane(self, request: web.Request) -> web.StreamResponse:
        for method, pattern, handler in self._control_routes:
            match = pattern.match(request.path)
            if match is None or method != request.method:
                continue
            if handler != self.control.health and not hmac.compare_digest(
                    request.headers.get("X-API-KEY", "").encode(), self.api_key.encode()):
                return _error(401, "Invalid API key")
            try:
                return await handler(request, *match.groups())
            except SandboxError as exc:
                return _error(exc.status, exc.message)
        return _error(501, f"fcvm: {request.method} {request.path} is not implemented")

    # --- data plane ------------------------------------------------------------------------------

    async def _data_plane(self, request: web.Request) -> web.StreamResponse:
        sandbox_id = request.headers[SANDBOX_HEADER]
        sandbox = self.sandboxes.find(sandbox_id)
        if sandbox is None or sandbox.state != SandboxState.RUNNING:
            return _error(502, f"The sandbox {sandbox_id[:40]} was not found")
        if request.headers.get(PORT_HEADER, str(ENVD_PORT)) != str(ENVD_PORT):
            return _error(502, f"The sandbox {sandbox_id} is running but port "
                               f"{request.headers[PORT_HEADER][:8]} is not open")
        route = (request.method, request.path)
        handler = self.envd.routes.get(route)
        if handler is None:
            return _connect_error(c.ConnectError(c.Code.UNIMPLEMENTED,
                                                 f"fcvm: {request.method} {request.path} is not implemented"))
        if route not in _UNAUTHENTICATED_DATA and not self._authorized(request, sandbox):
            if request.path == _FILES:
                return _error(401, "invalid access token or signature")
            return _connect_error(c.ConnectError(c.Code.UNAUTHENTICATED, "invalid access token"))
        try:
            return await handler(request, sandbox)
        except c.ConnectError as exc:
            if request.path in _STREAMS:
                response = web.StreamResponse(headers={"Content-Type": c.STREAM_CONTENT_TYPE})
                await response.prepare(request)
                await response.write(c.end_stream(exc))
                return response
            if request.path == _FILES:
                return _error(exc.code.http_status, exc.message)
            return _connect_error(exc)

    @staticmethod
    def _authorized(request: web.Request, sandbox: Sandbox) -> bool:
        token = request.headers.get("X-Access-Token")
        if token is not None:
            return hmac.compare_digest(token.encode(), sandbox.token.encode())
        signature = request.query.get("signature")
        if request.path == _FILES and signature is not None:
            operation = "read" if request.method == "GET" else "write"
            return valid_signature(sandbox.token, request.query.get("path", ""), operation,
                                   request.query.get("username", ""), signature,
                                   request.query.get("signature_expiration"))
        return False


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def _connect_error(error: c.ConnectError) -> web.Response:
    return web.json_response(error.to_json(), status=error.code.http_status)
