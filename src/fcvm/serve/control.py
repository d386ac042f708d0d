"""The control plane: E2B's REST API (spec/openapi.yml of e2b-dev/infra), v1 and v2 routes."""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from fcvm.serve import connect as c
from fcvm.serve.envd import ENVD_VERSION, check_env, read_body
from fcvm.serve.sandboxes import (
    DEFAULT_TIMEOUT,
    MAX_FORKS,
    Sandbox,
    SandboxError,
    Sandboxes,
    SandboxState,
    check_timeout,
)

CLIENT_ID = "fcvm"
# A sandbox's `domain`: the SDK builds sandbox hosts from it when E2B_SANDBOX_URL is unset. Naming a local one
# makes such a client fail to connect rather than send its files and token to e2b.app.
SANDBOX_DOMAIN = "localhost"
_MAX_BODY = 1 << 20
_LIST_LIMIT = 100

Handler = Callable[..., Awaitable[web.StreamResponse]]


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def sandbox_json(sandbox: Sandbox) -> dict[str, Any]:
    return {"templateID": sandbox.template_id, "sandboxID": sandbox.id, "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION, "envdAccessToken": sandbox.token, "domain": SANDBOX_DOMAIN}


def listed_json(sandbox: Sandbox) -> dict[str, Any]:
    return {"templateID": sandbox.template_id, "sandboxID": sandbox.id, "clientID": CLIENT_ID,
            "startedAt": _rfc3339(sandbox.started_at), "endAt": _rfc3339(sandbox.end_at),
            "cpuCount": sandbox.vcpus, "memoryMB": sandbox.mem_mib, "diskSizeMB": sandbox.disk_mib,
            "state": str(sandbox.state), "envdVersion": ENVD_VERSION, "metadata": sandbox.metadata}


def detail_json(sandbox: Sandbox) -> dict[str, Any]:
    return {**listed_json(sandbox), "envdAccessToken": sandbox.token, "domain": SANDBOX_DOMAIN,
            "lifecycle": {"autoResume": False, "onTimeout": "pause" if sandbox.auto_pause else "kill"}}


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request, _MAX_BODY)
    if raw is None:
        raise SandboxError(413, "request body too large")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SandboxError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise SandboxError(400, "the request body must be a JSON object")
    return body


def _string_map(body: dict[str, Any], key: str) -> dict[str, str]:
    value = body.get(key) or {}
    if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise SandboxError(400, f"{key} must map strings to strings")
    return value


def _timeout(body: dict[str, Any], key: str = "timeout", default: int = DEFAULT_TIMEOUT) -> int:
    return check_timeout(body.get(key, default) if body.get(key) is not None else default, key)


def _metadata_filter(query: str | None) -> dict[str, str]:
    """`metadata=k1%3Dv1%26k2%3Dv2`: the SDK url-encodes k=v pairs, each part quoted."""
    if not query:
        return {}
    return {urllib.parse.unquote(k): urllib.parse.unquote(v)
            for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)}


def _matches(sandbox: Sandbox, metadata: dict[str, str]) -> bool:
    return all(sandbox.metadata.get(k) == v for k, v in metadata.items())


class ControlPlane:
    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes = sandboxes
        self.routes: list[tuple[str, str, Handler]] = [
            ("POST", "/sandboxes", self.create),
            ("POST", "/v2/sandboxes", self.create),
            ("GET", "/sandboxes", self.list_v1),
            ("GET", "/v2/sandboxes", self.list_v2),
            ("GET", "/sandboxes/{id}", self.get),
            ("DELETE", "/sandboxes/{id}", self.kill),
            ("POST", "/sandboxes/{id}/timeout", self.timeout),
            ("POST", "/sandboxes/{id}/refreshes", self.refresh),
            ("POST", "/sandboxes/{id}/connect", self.connect),
            ("POST", "/v2/sandboxes/{id}/connect", self.connect),
            ("POST", "/sandboxes/{id}/pause", self.pause),
            ("POST", "/sandboxes/{id}/resume", self.resume),
            ("POST", "/sandboxes/{id}/snapshots", self.snapshot),
            ("GET", "/snapshots", self.list_snapshots),
            ("DELETE", "/templates/{id}", self.delete_snapshot),
            ("POST", "/sandboxes/{id}/fork", self.fork),
            ("POST", "/v2/sandboxes/{id}/fork", self.fork),
            ("GET", "/health", self.health),
        ]

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        template = body.get("templateID")
        if not (isinstance(template, str) and template):
            raise SandboxError(400, "templateID is required")
        auto_pause = body.get("autoPause", False)
        if not isinstance(auto_pause, bool):
            raise SandboxError(400, "autoPause must be true or false")
        try:
            envs = check_env(_string_map(body, "envVars"))
        except c.ConnectError as exc:
            raise SandboxError(400, exc.message) from None
        sandbox = await self.sandboxes.create(template, timeout=_timeout(body), metadata=_string_map(body, "metadata"),
                                              envs=envs, auto_pause=auto_pause)
        return web.json_response(sandbox_json(sandbox), status=201)

    async def list_v1(self, request: web.Request) -> web.StreamResponse:
        metadata = _metadata_filter(request.query.get("metadata"))
        return web.json_response([listed_json(s) for s in self.sandboxes.all()
                                  if s.state == SandboxState.RUNNING and _matches(s, metadata)])

    async def list_v2(self, request: web.Request) -> web.StreamResponse:
        metadata = _metadata_filter(request.query.get("metadata"))
        states = {s for s in request.query.get("state", "running,paused").split(",") if s}
        if not states <= {str(s) for s in SandboxState}:
            raise SandboxError(400, "state must be running, paused or both")
        template = request.query.get("template")
        selected = [s for s in self.sandboxes.all() if str(s.state) in states and _matches(s, metadata)
                    and (template is None or s.template_id == template)]
        if request.query.get("order") == "desc":
            selected.reverse()
        limit = request.query.get("limit", str(_LIST_LIMIT))
        token = request.query.get("nextToken", "0")
        if not (limit.isdigit() and 0 < int(limit) <= _LIST_LIMIT * 10 and token.isdigit()):
            raise SandboxError(400, "limit and nextToken must be positive integers")
        start, count = int(token), int(limit)
        page = selected[start:start + count]
        headers = {"X-Next-Token": str(start + count)} if start + count < len(selected) else {}
        return web.json_response([listed_json(s) for s in page], headers=headers)

    async def get(self, request: web.Request, sandbox_id: str) -> web.StreamResponse:
        return web.json_response(detail_json(self.sandboxes.get(sandbox_id)))

    async def kill(self, request: web.Request, sandbox_id: str) -> web.StreamResponse:
        await self.sandboxes.kill(sandbox_id)
        return web.Response(status=204)

    async def timeout(self, request: web.Request, sandbox_id: str) -> web.StreamResponse:
        body = await _body(request)
        if "timeout" not in body:
            raise SandboxError(400, "timeout is required")
        self.sandboxes.set_timeout(sandbox_id, _timeout(body))
        return web.Response(status=204)

    async def refresh(self, request: web.Request, sandbox_id: str) -> web.StreamResponse:
        body = await _body(request)
        self.sandboxes.refresh(sandbox_id, _timeout(body, "duration", default=60))
        return web.Response(status=204)

    async def connect(self, request: web.Request, sandbox_id: str) -> web.StreamResponse:
        sandbox, resumed = await self.sandboxes.connect(sandbox_id, _timeout(await _body(request)))
        return web.json_response(sandbox_json(sandbox), status=201 if resumed else 200)

    async def pause(self, request: web.Request, sandbox_id: str) -> web.StreamResponse:
        await _body(request)
        await self.sandboxes.pause(sandbox_id)
        return web.Response(status=204)

    async def resume(self, request: web.Request, sandbox_id: str) -> web.StreamResponse:
        sandbox = await self.sandboxes.resume(sandbox_id, _timeout(await _body(request)))
        return web.json_response(sandbox_json(sandbox), status=201)

    async def snapshot(self, request: web.Request, sandbox_id: str) -> web.StreamResponse:
        body = await _body(request)
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise SandboxError(400, "name must be a string")
        tag = await self.sandboxes.snapshot(sandbox_id, name or None)
        return web.json_response({"snapshotID": tag, "names": [tag]}, status=201)

    async def list_snapshots(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("name")
        tags = self.sandboxes.snapshots(request.query.get("sandboxID"))
        return web.json_response([{"snapshotID": t, "names": [t]} for t in tags if name is None or t == name])

    async def delete_snapshot(self, request: web.Request, tag: str) -> web.StreamResponse:
        await self.sandboxes.delete_snapshot(urllib.parse.unquote(tag))
        return web.Response(status=204)

    async def fork(self, request: web.Request, sandbox_id: str) -> web.StreamResponse:
        body = await _body(request)
        count = body.get("count", 1)
        if not (isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= MAX_FORKS):
            raise SandboxError(400, f"count must be 1 to {MAX_FORKS}")
        results = await self.sandboxes.fork(sandbox_id, count, _timeout(body))
        return web.json_response([{"sandbox": sandbox_json(r)} if isinstance(r, Sandbox)
                                  else {"error": {"code": r.status, "message": r.message}} for r in results],
                                 status=201)
