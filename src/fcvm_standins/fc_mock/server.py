"""HTTP/1.1 (keep-alive) on the API Unix socket, in front of `FcMock.handle`.

Every response carries `X-Fcvm-Mock: 1`, the honest marker that this is fc-mock, not Firecracker.
"""

from __future__ import annotations

import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from fcvm.core import log
from fcvm_standins.fc_mock.api import FcMock, Response

_log = log.get("fc_mock.http")

MOCK_HEADER = "X-Fcvm-Mock"


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    server_version = "Firecracker API (fc-mock)"
    sys_version = ""

    def address_string(self) -> str:
        return "api-socket"

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug(format, *args)

    def _reply(self, response: Response) -> None:
        data = b"" if response.body is None else json.dumps(response.body).encode()
        self.send_response(response.status)
        self.send_header(MOCK_HEADER, "1")
        if response.status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if response.status != 204:
            self.wfile.write(data)
        self.wfile.flush()

    def _dispatch(self) -> None:
        api = self.server.api
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._reply(Response.fault("Chunked transfer encoding is not supported."))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            self._reply(Response.fault("Invalid Content-Length header."))
            return
        if length > api.max_payload:
            # Do not read an oversized body; answer and drop the connection.
            self.close_connection = True
            self._reply(Response.fault(f"Request payload with size {length} is larger than the limit of "
                                       f"{api.max_payload} allowed by server."))
            return
        raw = self.rfile.read(length) if length else b""
        response = api.handle(self.command, self.path, raw)
        _log.debug("%s %s -> %d", self.command, self.path, response.status)
        self._reply(response)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _dispatch


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, api: FcMock) -> None:
        self.api = api
        super().__init__(path, _Handler)

    def stop_soon(self) -> None:
        threading.Thread(target=self.shutdown, name="fc-mock-shutdown", daemon=True).start()
