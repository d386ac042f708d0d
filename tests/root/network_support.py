"""The outside world of the network tests: a network namespace joined to this host by a veth, as another host
on the LAN would be."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

_OUTSIDE_SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
tcp = socket.create_server(("0.0.0.0", port))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))

def serve_tcp():
    while True:
        conn, addr = tcp.accept()
        with conn:
            conn.sendall(f"outside saw {addr[0]}\n".encode())

def serve_udp():
    seen = []  # every datagram that ever arrived, so a client learns whether an earlier one got through
    while True:
        data, addr = udp.recvfrom(2048)
        seen.append(f"{data.decode()}@{addr[0]}")
        udp.sendto(" ".join(seen).encode(), addr)

threading.Thread(target=serve_tcp, daemon=True).start()
print("ready", flush=True)
serve_udp()
"""

_CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
        print("ok", conn.makefile().readline().strip())
except OSError as exc:
    print("error", exc)
"""


@dataclass
class Outside:
    netns: str
    host_ip: str  # the host's address on the link to it: one more address of the host
    ip: str
    port: int  # TCP answers "outside saw SOURCE"; UDP answers with every "PAYLOAD@SOURCE" it ever received

    def connect(self, host: str, port: int) -> str:
        """Connect from outside: "ok " + the first line the server sends, or "error " + why."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", sys.executable, "-c", _CLIENT,
                               host, str(port)], check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def outside_world() -> Iterator[Outside]:
    """A namespace joined to this host by a veth, serving TCP and UDP on port 7777."""
    from pyroute2 import IPRoute
    from pyroute2 import netns as pr_netns

    tag = secrets.token_hex(3)
    name, host_if = f"fcvi-{tag}", f"fcvi{tag}h"
    octet = int(tag[:2], 16)
    host_ip, outside_ip = f"198.19.{octet}.1", f"198.19.{octet}.2"
    pr_netns.create(name)
    server = None
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            index = ipr.link_lookup(ifname=host_if)[0]
            ipr.addr("add", index=index, address=host_ip, prefixlen=30)
            ipr.link("set", index=index, state="up")
        with IPRoute(netns=name) as ipr:
            for ifname in ("lo", "eth0"):
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=outside_ip, prefixlen=30)
            ipr.route("add", dst="0.0.0.0/0", gateway=host_ip)
        server = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{name}", sys.executable, "-c", _OUTSIDE_SERVER, "7777"],
            stdout=subprocess.PIPE, text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield Outside(name, host_ip, outside_ip, 7777)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=host_if):
                ipr.link("del", index=index)
        pr_netns.remove(name)
