"""From inside a real container: the host's services are out of reach, except its loopback with
--allow-host-loopback (at the guest's gateway address), which `fcvm podman run` hands all the way down."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fcvm.network import GATEWAY_IP
from tests.support import require
from tests.vm.support import fcvm, vm_row


@contextlib.contextmanager
def http_service(address: str, body: str) -> Iterator[int]:
    """An HTTP server on this host answering `body`; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((address, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _host_address() -> str:
    """This host's address on its default route: a host address that is neither loopback nor a VM's gateway."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return ""
        return str(probe.getsockname()[0])


def test_a_container_reaches_the_hosts_loopback_only_when_allowed(guest_assets: None) -> None:
    host = _host_address()
    require(bool(host) and not ipaddress.ip_address(host).is_loopback, "needs a route off this host")
    with (http_service("127.0.0.1", "loopback service") as loopback_port,
          http_service("0.0.0.0", "host service") as host_port):
        fcvm("podman", "run", "-d", "--name", "iso", "--network", "bridged", "--hypervisor", "qemu",
             "--allow-host-loopback", "localhost/fcvm-busybox", "sleep", "3600")
        try:
            network = vm_row("iso")["network"]
            assert isinstance(network, dict) and network["host_loopback"] is True

            def wget(url: str) -> tuple[int, str]:
                # Not wget -q or -T: this busybox's wget crashes with them.
                result = fcvm("exec", "iso", "--", "timeout", "30", "wget", "-O", "-", url, check=False)
                return result.returncode, result.stdout

            assert wget(f"http://{GATEWAY_IP}:{loopback_port}/") == (0, "loopback service")
            code, page = wget(f"http://{host}:{host_port}/")
            assert code != 0 and page == ""
        finally:
            fcvm("stop", "iso")
            fcvm("rm", "iso")
