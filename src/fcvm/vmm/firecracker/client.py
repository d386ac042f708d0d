"""HTTP/1.1 client for the Firecracker API on its Unix socket (httpx).

Every failure becomes a `FirecrackerApiError` (an `FcvmError`) that names the request and carries
Firecracker's `fault_message`, so the CLI prints one clear line.

fc-mock identifies itself with the response header `X-Fcvm-Mock: 1` on every answer (and
`--version` prints "... (fc-mock)"); a real Firecracker never sends it. `Client.is_mock` reports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from fcvm.core import log
from fcvm.core.errors import FcvmError
from fcvm.vmm.firecracker.models import MMDS, Model, Version, check_supported

_log = log.get("vmm.firecracker")

MOCK_HEADER = "X-Fcvm-Mock"


class FirecrackerError(FcvmError):
    """Firecracker failed: it did not start, died, or refused a request."""


class FirecrackerApiError(FirecrackerError):
    """Firecracker answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        super().__init__(f"Firecracker rejected {method} {path} ({status}): {fault_message}")
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message


class FirecrackerConnectionError(FirecrackerError):
    """The API socket went away or never answered (Firecracker most likely exited)."""


class Client:
    """One keep-alive connection to one Firecracker's API socket."""

    def __init__(self, socket_path: Path, *, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)),
            base_url="http://localhost",
            timeout=timeout,
        )
        self.is_mock = False
        self.version_text: str | None = None
        self.version: Version | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw requests -------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Model | dict[str, Any] | None = None) -> Any:
        """Send one request; return the decoded JSON for 200, None for 204."""
        payload: dict[str, Any] | None
        payload = body.body(self.version) if isinstance(body, Model) else body
        content = None if payload is None else json.dumps(payload).encode()
        headers = {"Accept": "application/json"}
        if content is not None:
            headers["Content-Type"] = "application/json"
        _log.debug("%s %s %s", method, path, _loggable(path, content))
        try:
            response = self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise FirecrackerConnectionError(
                f"no answer from Firecracker to {method} {path} on {self.socket_path}: {exc or type(exc).__name__}"
            ) from exc
        if response.headers.get(MOCK_HEADER) == "1":
            self.is_mock = True
        if response.status_code >= 400:
            raise FirecrackerApiError(method, path, response.status_code, _fault_message(response))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise FirecrackerError(f"Firecracker answered {method} {path} with invalid JSON") from exc

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def put(self, path: str, body: Model | dict[str, Any]) -> None:
        self.request("PUT", path, body)

    def patch(self, path: str, body: Model | dict[str, Any]) -> None:
        self.request("PATCH", path, body)

    # -- helpers ------------------------------------------------------------------------------

    def negotiate(self) -> Version:
        """`GET /version`, check fcvm supports it, and remember it for version-gated fields."""
        answer = self.get("/version")
        text = answer.get("firecracker_version") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise FirecrackerError(f"GET /version answered {answer!r}, not a firecracker_version")
        self.version = check_supported(text)
        self.version_text = text
        return self.version


def _loggable(path: str, content: bytes | None) -> str:
    """A request body as the debug log shows it. MMDS data is the guest's plan, the container's environment
    (its secrets) included: only its size is shown."""
    if not content:
        return ""
    if path.split("?", 1)[0] == MMDS:
        return f"<{len(content)} bytes of MMDS data, not logged>"
    return content.decode(errors="replace")


def _fault_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        text = response.text.strip()
        return text or response.reason_phrase or "no error message"
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return str(data["fault_message"])
    return json.dumps(data)
