"""A VM reaches the world, not its neighbours: attacks from inside a guest against other VMs, the host and
the host's firewall, against the real kernel.

The guests are test_network's fake guests (a process behind the VM's TAP, in a network namespace of its own,
as root there: it may send from any address). "Outside" is a namespace joined to the host by a veth.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm import network
from fcvm.network import VmNetwork, parse_publish, setup_network, teardown_network
from fcvm.state.journal import Journal
from fcvm.state.store import Store
from tests.root.network_support import Outside
from tests.root.test_network import FakeGuest, _tcp_line, free_port

MODES = ["bridged", "rootless"]
SPOOFED = "203.0.113.7"  # TEST-NET-3: nobody's address
pytestmark = pytest.mark.usefixtures("network_prerequisites")


# --- services on the host -------------------------------------------------------------------------------------


def _answer(sock: socket.socket) -> None:
    """Answer "host service" to every TCP client or UDP datagram, until the socket is closed."""
    try:
        while True:
            if sock.type == socket.SOCK_STREAM:
                conn, _ = sock.accept()
                with conn:
                    conn.sendall(b"host service\n")
            else:
                _, addr = sock.recvfrom(2048)
                if addr is None:  # shut down
                    return
                sock.sendto(b"host service", addr)
    except OSError:
        return


@contextlib.contextmanager
def host_service(kind: socket.SocketKind, address: str, port: int = 0) -> Iterator[int]:
    """A TCP or UDP service on this host; yields its port."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        threading.Thread(target=_answer, args=(sock,), daemon=True).start()
        try:
            yield int(sock.getsockname()[1])
        finally:
            with contextlib.suppress(OSError):  # wakes the thread; raises ENOTCONN for UDP, having done so
                sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def vm(mode: str, *ports: str, host_loopback: bool = False,
       tcp_ports: tuple[int, ...] = (80,)) -> Iterator[tuple[VmNetwork, FakeGuest]]:
    """A VM's network with a fake guest serving TCP on `tcp_ports`; all gone again afterwards."""
    store = Store()
    vm_id = secrets.token_hex(6)
    journal = Journal(store, vm_id)
    options = {"host_loopback": True} if host_loopback else {}  # the default, as `fcvm podman run` without it
    net = setup_network(mode, store=store, journal=journal, vm_id=vm_id,
                        ports=[parse_publish(p) for p in ports], **options)
    try:
        guest = FakeGuest(net, tcp_ports=tcp_ports)
        try:
            yield net, guest
        finally:
            guest.stop()
    finally:
        assert teardown_network(journal) == []


# --- tests ----------------------------------------------------------------------------------------------------


def test_a_vm_reaches_another_vm_only_through_its_published_ports() -> None:
    published = free_port()
    with vm("bridged") as (a_net, a), vm("bridged", f"{published}:80", tcp_ports=(80, 81)) as (b_net, b):
        # Not B's unpublished port, nor the published one bypassing the host port, nor B's side of the host.
        assert a.connect(b_net.ns_side_ip, 81).startswith("error")
        assert a.connect(b_net.ns_side_ip, 80).startswith("error")
        with host_service(socket.SOCK_STREAM, "0.0.0.0") as port:
            assert a.connect(b_net.host_side_ip, port).startswith("error")
        # B's published port, on any address of the host, as any outside client would reach it.
        assert a.connect(a_net.host_side_ip, published) == f"ok guest tcp 80 from {b_net.host_side_ip}"
        # ... and from the host itself, as before; but a host user gets no further than a published port either.
        assert _tcp_line("127.0.0.1", published).startswith("guest tcp 80 from ")
        with pytest.raises(OSError):
            _tcp_line(b_net.ns_side_ip, 81)
        # The same holds the other way round.
        assert b.connect(a_net.ns_side_ip, 80).startswith("error")


def test_a_vm_reaches_no_host_service_on_any_host_address(outside: Outside) -> None:
    with vm("bridged") as (net, guest), host_service(socket.SOCK_STREAM, "0.0.0.0") as port:
        assert _tcp_line("127.0.0.1", port) == "host service"  # the service is up
        for address in (net.host_side_ip, outside.host_ip, network.GATEWAY_IP):
            reply = guest.connect(address, port)
            assert reply.startswith("error"), f"{address}: {reply}"
        # The outside world is still there.
        assert guest.connect(outside.ip, outside.port) == f"ok outside saw {outside.host_ip}"


def test_dns_on_a_host_address_is_the_one_host_service_a_vm_reaches(outside: Outside,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The guest's resolv.conf lists the host's own non-loopback nameservers: here one on a host address.
    monkeypatch.setattr(network.base, "host_dns", lambda: [outside.host_ip])
    with (host_service(socket.SOCK_DGRAM, outside.host_ip, 53),
          host_service(socket.SOCK_DGRAM, outside.host_ip) as other,
          vm("bridged") as (net, guest)):
        assert net.guest_spec()["dns"] == [outside.host_ip]
        assert guest.udp(outside.host_ip, 53, "query") == "ok host service"
        assert guest.udp(outside.host_ip, other, "query").startswith("error")


@pytest.mark.parametrize("mode", MODES)
def test_allow_host_loopback_opens_the_hosts_loopback_at_the_gateway(mode: str) -> None:
    with (host_service(socket.SOCK_STREAM, "127.0.0.1") as tcp_port,
          host_service(socket.SOCK_DGRAM, "127.0.0.1") as udp_port):
        with vm(mode) as (_, guest):
            assert guest.connect(network.GATEWAY_IP, tcp_port).startswith("error")
        with vm(mode, host_loopback=True) as (net, guest):
            assert net.host_loopback and VmNetwork.from_json(net.to_json()).host_loopback
            assert guest.connect(network.GATEWAY_IP, tcp_port) == "ok host service"
            assert guest.udp(network.GATEWAY_IP, udp_port, "hello") == "ok host service"


@pytest.mark.parametrize("mode", MODES)
def test_a_spoofed_source_never_leaves_the_vm(mode: str, outside: Outside) -> None:
    with vm(mode) as (_, guest):
        assert guest.udp(outside.ip, outside.port, "spoofed", source=SPOOFED, reply=False) == "ok sent"
        # Sent after the spoofed datagram on the same path: when its answer comes, the other has arrived or never
        # will. The answer lists everything the outside ever received.
        reply = guest.udp(outside.ip, outside.port, "honest")
        assert reply.startswith("ok ") and "honest@" in reply
        assert "spoofed" not in reply
        # Nor does a TCP connection from a spoofed source get anywhere.
        assert guest.connect(outside.ip, outside.port, source=SPOOFED).startswith("error")


_HOST_WITH_A_FIREWALL = r"""
import json, subprocess, sys
from pathlib import Path
from tests.root.network_support import outside_world
from tests.root.test_network_isolation import vm

Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
with outside_world() as outside:
    # The host's firewall, there before any VM: forward nothing by default, never to the outside's TCP service.
    subprocess.run(["iptables", "-P", "FORWARD", "DROP"], check=True)
    subprocess.run(["iptables", "-A", "FORWARD", "-d", outside.ip, "-p", "tcp", "--dport", str(outside.port),
                    "-j", "REJECT"], check=True)
    with vm("bridged", f"{sys.argv[1]}:80", tcp_ports=(80, 81)) as (net, guest):
        print(json.dumps({
            "vm to outside tcp": guest.connect(outside.ip, outside.port),
            "vm to outside udp": guest.udp(outside.ip, outside.port, "hello"),
            "outside to published port": outside.connect(outside.host_ip, int(sys.argv[1])),
            "outside to unpublished port": outside.connect(net.ns_side_ip, 81),
        }))
"""


def test_the_host_firewall_keeps_its_say_over_vm_traffic(tmp_path: Path) -> None:
    # A host of its own (a network namespace): nobody else's VMs, and a firewall set up before fcvm's hooks.
    published = free_port()
    result = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", _HOST_WITH_A_FIREWALL, str(published)],
                            env={**os.environ, "FCVM_NET_RUN_DIR": str(tmp_path / "run")},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # fcvm's rules do not override the host's ...
    assert seen["vm to outside tcp"].startswith("error")
    # ... but under a FORWARD policy of DROP they let the VM's own traffic through, and only that.
    assert seen["vm to outside udp"].startswith("ok ")
    assert seen["outside to published port"].startswith("ok guest tcp 80 from ")
    assert seen["outside to unpublished port"].startswith("error")


_ROOTLESS_BESIDE_A_NETNS = r"""
import json, secrets
from pathlib import Path
from pyroute2 import netns as pr_netns
from fcvm.network import parse_publish, setup_network, teardown_network
from fcvm.state.journal import Journal
from fcvm.state.store import Store

def netns_mounts():
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith("/run/netns/")]

neighbour = "fcvi-" + secrets.token_hex(3)  # another VM's namespace, say
pr_netns.create(neighbour)
store, vm_id = Store(), secrets.token_hex(6)
journal = Journal(store, vm_id)
try:
    setup_network("rootless", store=store, journal=journal, vm_id=vm_id, ports=[parse_publish("127.0.0.1:18080:80")])
    slirp = next(e.data["pid"] for e in journal.entries() if e.data.get("what") == "slirp4netns")
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{slirp}/status").read_text().splitlines())
    print(json.dumps({
        "neighbour mounted": f"/run/netns/{neighbour}" in netns_mounts(),
        "effective capabilities": int(status["CapEff"], 16),
        "seccomp": status["Seccomp"].strip(),
        "no new privileges": status["NoNewPrivs"].strip(),
    }))
finally:
    teardown_network(journal)
    pr_netns.remove(neighbour)
"""


def test_slirp4netns_runs_sandboxed_and_leaves_the_hosts_namespaces_mounted() -> None:
    # In a mount namespace of its own whose mounts propagate among themselves as the host's do: should the
    # sandbox's pivot_root unmount /run/netns/* (as it does when real root starts it in the host's user
    # namespace), only this copy suffers.
    shared_again = ["sh", "-c", 'mount --make-rshared / && exec "$@"', "sh"]
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", *shared_again,
                             sys.executable, "-c", _ROOTLESS_BESIDE_A_NETNS],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["neighbour mounted"]
    cap_net_bind_service = 1 << 10
    assert seen["effective capabilities"] & ~cap_net_bind_service == 0
    assert seen["seccomp"] == "2" and seen["no new privileges"] == "1"
