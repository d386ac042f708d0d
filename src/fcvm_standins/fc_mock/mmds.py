"""MMDS for fc-mock: the data store (RFC 7396 merge) and the guest-facing MMDS HTTP server.

Firecracker answers ARP and TCP for the MMDS address inside its own device model. fc-mock cannot
see the guest's frames (QEMU owns the TAP), so it does the next best thing inside the VM's network
namespace: it adds the MMDS address (/32) to the TAP (or to the TAP's bridge, if it is enslaved),
so the kernel answers ARP for it, and listens on <address>:80. The guest side is unchanged:
`ip route add 169.254.169.254 dev eth0`, then V2 tokens as with Firecracker. The difference a
guest could notice: the packets do reach the host namespace (any firewall there applies).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fcvm.core import log

_log = log.get("fc_mock.mmds")

TOKEN_TTL_HEADER = "X-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-metadata-token"
_AWS_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_AWS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL = 21600


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def lookup(store: Any, path: str) -> tuple[bool, Any]:
    node = store
    for part in [p for p in path.split("/") if p]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def imds_text(value: Any) -> str | None:
    """EC2 IMDS text format: an object lists its keys (objects with a trailing '/'), a string is itself."""
    if isinstance(value, dict):
        return "\n".join(f"{k}/" if isinstance(v, dict) else k for k, v in value.items())
    if isinstance(value, str):
        return value
    return None


class TokenStore:
    def __init__(self) -> None:
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()

    def issue(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.monotonic()


class _Handler(BaseHTTPRequestHandler):
    server: MmdsServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("guest %s", format % args)

    def _send(self, status: int, body: str, content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 65536))

    def do_PUT(self) -> None:
        self._drain()
        if self.path.split("?")[0] != "/latest/api/token":
            self._send(405, "Not allowed HTTP method.")
            return
        if self.headers.get("X-Forwarded-For"):
            self._send(400, "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For")
            return
        raw = self.headers.get(TOKEN_TTL_HEADER) or self.headers.get(_AWS_TTL_HEADER)
        try:
            ttl = int(raw or "")
        except ValueError:
            self._send(400, f"Token time to live value not found. Use `{TOKEN_TTL_HEADER}` header "
                            "to specify the token's lifetime.")
            return
        if not 1 <= ttl <= MAX_TTL:
            self._send(400, f"Invalid time to live value provided for token: {ttl}. "
                            f"Please provide a value between 1 and {MAX_TTL}.")
            return
        self._send(200, self.server.tokens.issue(ttl))

    def do_GET(self) -> None:
        self._drain()
        if self.server.version == "V2":
            token = self.headers.get(TOKEN_HEADER) or self.headers.get(_AWS_TOKEN_HEADER)
            if not token:
                self._send(401, f"No MMDS token provided. Use `{TOKEN_HEADER}` header to specify "
                                "the session token.")
                return
            if not self.server.tokens.valid(token):
                self._send(401, "MMDS token not valid.")
                return
        path = self.path.split("?")[0]
        found, value = lookup(self.server.store(), path)
        if not found:
            self._send(404, f"Resource not found: {path}.")
            return
        if "application/json" in (self.headers.get("Accept") or ""):
            self._send(200, json.dumps(value), "application/json")
            return
        text = imds_text(value)
        if text is None:
            self._send(400, "Cannot retrieve value. The value has an invalid format.")
            return
        self._send(200, text)

    def _not_allowed(self) -> None:
        self._drain()
        self._send(405, "Not allowed HTTP method.")

    do_POST = do_PATCH = do_DELETE = do_HEAD = _not_allowed


class MmdsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: str, port: int, store: Callable[[], Any], version: str) -> None:
        self.store = store
        self.version = version
        self.tokens = TokenStore()
        super().__init__((address, port), _Handler)


class GuestMmds:
    """The MMDS address on the TAP (or its bridge) plus the HTTP server; `close()` undoes both."""

    def __init__(self, address: str, tap: str, store: Callable[[], Any], version: str, port: int = 80) -> None:
        self.address = address
        self.tap = tap
        self._added_on: int | None = None
        self._server: MmdsServer | None = None
        self._add_address()
        self._server = MmdsServer(address, port, store, version)
        threading.Thread(target=self._server.serve_forever, name="mmds", daemon=True).start()
        _log.info("MMDS %s on %s:%d via %s", version, address, port, tap)

    def _add_address(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=self.tap)
            if not links:
                raise OSError(f"no network device {self.tap}")
            index = links[0]
            link = ipr.get_links(index)[0]
            master = link.get_attr("IFLA_MASTER")
            target = int(master) if master else index
            existing = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=target)]
            if self.address not in existing:
                ipr.addr("add", index=target, address=self.address, prefixlen=32)
                self._added_on = target

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._added_on is not None:
            from pyroute2 import IPRoute

            with contextlib.suppress(Exception), IPRoute() as ipr:
                ipr.addr("del", index=self._added_on, address=self.address, prefixlen=32)
            self._added_on = None
