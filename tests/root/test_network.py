"""VM networking, both modes, against the real kernel: published ports reach a guest, the guest reaches the
outside, and teardown (or gc after a SIGKILL) leaves the host exactly as it was.

The "guest" is a small process started through VmNetwork.enter_argv(), like a VMM: it attaches to the VM's
TAP, makes a network namespace of its own with a second TAP holding GUEST_IP/GUEST_MAC, relays frames
between the two, and serves TCP and UDP on GUEST_IP. "Outside" is a namespace the test makes, joined to the
host by a veth; nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fcvm import network
from fcvm.core.errors import FcvmError
from fcvm.core.proc import ProcessRef
from fcvm.network import VmNetwork, parse_publish, setup_network, teardown_network
from fcvm.run import cleanup
from fcvm.state.journal import Journal
from fcvm.state.store import Store
from tests.root.network_support import Outside
from tests.support import require

MODES = ["bridged", "rootless"]
pytestmark = pytest.mark.usefixtures("network_prerequisites")


# --- host state -----------------------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def host_state() -> dict[str, Any]:
    """Everything network setup could change on the host."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        links = sorted(
            (link.get_attr("IFLA_IFNAME"), str((link.get_attr("IFLA_LINKINFO") or {}).get("attrs", "")))
            for link in ipr.get_links()
        )
        addrs = sorted((names.get(a["index"]), a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr())
        routes = sorted(
            (r.get_attr("RTA_DST") or "default", r["dst_len"], r.get_attr("RTA_GATEWAY") or "",
             names.get(r.get_attr("RTA_OIF")))
            for r in ipr.get_routes(family=2, table=254)
        )
    sysctls = {"ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()}
    for conf in Path("/proc/sys/net/ipv4/conf").iterdir():
        for key in ("forwarding", "route_localnet", "accept_redirects"):
            sysctls[f"{conf.name}.{key}"] = (conf / key).read_text().strip()
    iptables = [
        re.sub(r"\[\d+:\d+\]", "", line)
        for line in _run(["iptables-save"]).splitlines()
        if not line.startswith("#")
    ]
    nft_tables = _run(["nft", "list", "tables"]).splitlines() if _has("nft") else []
    mounts = sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                    if "/run/netns/" in line.split()[4])
    netns = sorted(os.listdir("/run/netns")) if Path("/run/netns").is_dir() else []
    return {"links": links, "addrs": addrs, "routes": routes, "sysctls": sysctls, "iptables": iptables,
            "nft_tables": nft_tables, "netns_mounts": mounts, "netns": netns,
            "shared_state": Path("/run/fcvm/net-host.json").exists()}


def _has(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def assert_host_restored(before: dict[str, Any]) -> None:
    after = host_state()
    for key in before:
        assert after[key] == before[key], f"host {key} differs after teardown"


def assert_nothing_held(store: Store, vm_id: str) -> None:
    assert store.allocations(vm_id) == {}
    assert store.journal_entries(vm_id) == []


def journaled_processes(store: Store, vm_id: str) -> list[ProcessRef]:
    return [ProcessRef(e.data["pid"], e.data["start"]) for e in store.journal_entries(vm_id) if e.kind == "process"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


# --- the fake guest ------------------------------------------------------------------------------------

_GUEST = r"""
import ctypes, fcntl, json, os, socket, struct, sys, threading
from pyroute2 import IPRoute

cfg = json.loads(sys.argv[1])
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000

def tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd

vm_tap = tap(cfg["tap"])  # what the VMM would open, in the VM's namespace
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET: the guest's own network
    raise OSError(ctypes.get_errno(), "unshare")
guest_tap = tap("eth0")
with IPRoute() as ipr:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    eth0 = ipr.link_lookup(ifname="eth0")[0]
    ipr.link("set", index=eth0, address=cfg["mac"])
    ipr.addr("add", index=eth0, address=cfg["address"], prefixlen=cfg["prefix"])
    ipr.link("set", index=eth0, state="up")
    ipr.route("add", dst="0.0.0.0/0", gateway=cfg["gateway"])

def relay(src, dst):
    while True:
        data = os.read(src, 65536)
        try:
            os.write(dst, data)
        except OSError:
            pass

def tcp(srv, port):
    while True:
        conn, addr = srv.accept()
        with conn:
            conn.sendall(f"guest tcp {port} from {addr[0]}\n".encode())

def udp(sock, port):
    while True:
        data, addr = sock.recvfrom(2048)
        sock.sendto(b"guest udp %d: %s" % (port, data), addr)

def source(address):
    # Guest root may send from any address it likes: give the guest that address too.
    if address and address != cfg["address"]:
        with IPRoute() as ipr:
            if not ipr.get_addr(address=address):
                ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=address, prefixlen=32)
    return (address or "0.0.0.0", 0)

def client(request):
    kind = socket.SOCK_STREAM if request["op"] == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(5)
        sock.bind(source(request.get("source")))
        sock.connect((request["host"], request["port"]))
        if request["op"] == "tcp":
            return sock.makefile().readline().strip()
        sock.send(request["payload"].encode())
        return sock.recv(2048).decode() if request.get("reply", True) else "sent"

servers = [(tcp, (socket.create_server((cfg["address"], port)), port)) for port in cfg.get("tcp_ports", [80])]
udp_server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # all bound before "ready"
udp_server.bind((cfg["address"], 5353))
for target, args in [(relay, (vm_tap, guest_tap)), (relay, (guest_tap, vm_tap)), *servers,
                     (udp, (udp_server, 5353))]:
    threading.Thread(target=target, args=args, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    try:
        print("ok", client(json.loads(line)), flush=True)
    except OSError as exc:
        print("error", exc, flush=True)
"""


class FakeGuest:
    """A guest behind the VM's TAP. Its clients may send from any source address, as guest root can."""

    def __init__(self, net: VmNetwork, *, tcp_ports: tuple[int, ...] = (80,)) -> None:
        config = {**net.guest_spec(), "tap": net.tap, "tcp_ports": list(tcp_ports)}
        self.proc = subprocess.Popen([*net.enter_argv(), sys.executable, "-c", _GUEST, json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def _ask(self, **request: Any) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def connect(self, host: str, port: int, *, source: str = "") -> str:
        """Connect from inside the guest: "ok " + the first line the server sends, or "error " + why."""
        return self._ask(op="tcp", host=host, port=port, source=source)

    def udp(self, host: str, port: int, payload: str, *, source: str = "", reply: bool = True) -> str:
        """Send one datagram from inside the guest: "ok " + the answer (or "ok sent"), or "error " + why."""
        return self._ask(op="udp", host=host, port=port, payload=payload, source=source, reply=reply)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _tcp_line(addr: str, port: int) -> str:
    with socket.create_connection((addr, port), timeout=5) as conn:
        return conn.makefile().readline().strip()


def _udp_exchange(addr: str, port: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(payload, (addr, port))
        return sock.recvfrom(2048)[0]


# --- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_ports_reach_the_guest_egress_works_and_teardown_restores_the_host(mode: str, outside: Outside) -> None:
    before = host_state()
    store = Store()
    vm_id = secrets.token_hex(6)
    journal = Journal(store, vm_id)
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    net = setup_network(mode, store=store, journal=journal, vm_id=vm_id,
                        ports=[parse_publish(f"{tcp_port}:80"), parse_publish(f"{udp_port}:5353/udp")])
    # The row's `network` column takes it as is, and it comes back whole.
    assert VmNetwork.from_json(json.loads(json.dumps(net.to_json()))) == net
    processes = journaled_processes(store, vm_id)
    guest = FakeGuest(net)
    try:
        (addr, port, _), (udp_addr, _, _) = net.published()
        assert port == tcp_port
        assert addr == ("127.0.0.1" if mode == "bridged" else net.loopback)
        assert addr.startswith("127.")
        assert _tcp_line(addr, tcp_port).startswith("guest tcp 80 from ")
        assert _udp_exchange(udp_addr, udp_port, b"ping") == b"guest udp 5353: ping"
        with net.connect(80) as conn:
            assert conn.makefile().readline().startswith("guest tcp 80")
        if mode == "bridged":
            # podman users expect localhost to work, and other hosts (here: the outside namespace) too.
            assert _tcp_line("localhost", tcp_port).startswith("guest tcp 80")
            assert outside.connect(outside.host_ip, tcp_port) == f"ok guest tcp 80 from {outside.ip}"
        # Egress: the guest reaches the outside, masqueraded behind the host.
        assert guest.connect(outside.ip, outside.port) == f"ok outside saw {outside.host_ip}"
        if mode == "rootless":
            # ... but not services listening on the host's loopback (slirp4netns maps them to 10.0.2.2).
            with socket.create_server(("127.0.0.1", 0)) as private:
                reply = guest.connect(network.base.SLIRP_GATEWAY, private.getsockname()[1])
                assert reply.startswith("error") and "refused" in reply
    finally:
        guest.stop()
    assert teardown_network(journal) == []
    assert not any(p.alive() for p in processes)
    assert_nothing_held(store, vm_id)
    assert_host_restored(before)
    with pytest.raises(OSError):
        _tcp_line(addr, tcp_port)


_CHILD = r"""
import sys, time
from fcvm import network
from fcvm.core.proc import ProcessRef
from fcvm.network import base
from fcvm.state.journal import Journal
from fcvm.state.store import Store

mode, vm_id, stall = sys.argv[1], sys.argv[2], sys.argv[3] == "stall"
store = Store()
store.create_vm("vm-" + vm_id, vm_id=vm_id, process=ProcessRef.self())
if stall:  # stop after the host-side resources exist, before the namespace is configured
    def _stall(net, config):
        print("stalled", flush=True)
        time.sleep(3600)
    base.configure_inside = _stall
try:
    net = network.setup_network(mode, store=store, journal=Journal(store, vm_id), vm_id=vm_id,
                                ports=[network.parse_publish(p) for p in sys.argv[4:]])
except Exception as exc:
    print("error", type(exc).__name__, getattr(exc, "exit_code", 0), exc, flush=True)
    sys.exit(1)
print("ok", __import__("json").dumps(net.to_json()), flush=True)
"""


def _child(mode: str, vm_id: str, *ports: str, stall: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, mode, vm_id, "stall" if stall else "run", *ports],
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_mid_setup_then_gc_leaves_nothing(mode: str) -> None:
    before = host_state()
    store = Store()
    vm_id = secrets.token_hex(6)
    child = _child(mode, vm_id, f"{free_port()}:80", stall=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "stalled"
    kinds = {e.kind for e in store.journal_entries(vm_id)}
    assert kinds >= ({"netns", "link", "iptables", "net_host"} if mode == "bridged" else {"process", "socket"})
    processes = journaled_processes(store, vm_id)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # It really left things behind: links and rules (bridged), the namespace holder and slirp4netns (rootless).
    if mode == "bridged":
        assert host_state() != before
    else:
        assert len(processes) == 2 and all(p.alive() for p in processes)

    reaped = cleanup.reap_stale(store)  # what `fcvm gc` does
    assert [vm.id for vm in reaped] == [vm_id]
    assert not any(p.alive() for p in processes)
    assert_nothing_held(store, vm_id)
    assert_host_restored(before)


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_setups_never_share_an_address_or_a_port(mode: str) -> None:
    before = host_state()
    store = Store()
    ids = [secrets.token_hex(6) for _ in range(3)]
    contested = free_port()
    # Rootless VMs each publish on their own loopback address, so they only contend for an explicit one.
    spec = f"{contested}:80" if mode == "bridged" else f"127.0.0.1:{contested}:80"
    children = [_child(mode, vm_id, spec, f"{free_port()}:81") for vm_id in ids]
    results = [c.communicate(timeout=60)[0].strip() for c in children]
    try:
        winners = [json.loads(r[3:]) for r in results if r.startswith("ok ")]
        losers = [r for r in results if r.startswith("error ")]
        assert len(winners) == 1 and len(losers) == 2, results
        assert all(f"host port {contested}/tcp is already in use" in r for r in losers)
        # Without the contested port, every one of them gets its own address.
        others = [_child(mode, vm_id + "-b", f"{free_port()}:80") for vm_id in ids]
        extra = [c.communicate(timeout=60)[0].strip() for c in others]
        assert all(r.startswith("ok ") for r in extra), extra
        nets = winners + [json.loads(r[3:]) for r in extra]
        key = "subnet" if mode == "bridged" else "loopback"
        assert len({n[key] for n in nets}) == len(nets)
        if mode == "bridged":
            assert len({n["host_if"] for n in nets}) == len(nets)
            assert len({n["netns"] for n in nets}) == len(nets)
    finally:
        for vm_id in [*ids, *(i + "-b" for i in ids)]:
            assert teardown_network(Journal(store, vm_id)) == []
            assert_nothing_held(store, vm_id)
    assert_host_restored(before)


@pytest.mark.parametrize("mode", MODES)
def test_port_in_use_fails_cleanly(mode: str) -> None:
    store = Store()
    with socket.create_server(("0.0.0.0", 0)) as busy:
        port = busy.getsockname()[1]
        before = host_state()
        vm_id = secrets.token_hex(6)
        with pytest.raises(FcvmError) as info:
            setup_network(mode, store=store, journal=Journal(store, vm_id), vm_id=vm_id,
                          ports=[parse_publish(f"{free_port()}:81"), parse_publish(f"{port}:80")])
        message = str(info.value)
        assert f"host port {port}/tcp is already in use" in message and "choose another host port" in message
        assert "\n" not in message and info.value.exit_code != 0
        assert_nothing_held(store, vm_id)
        assert_host_restored(before)

    # Held by another VM in the state store (nothing listens: bridged DNAT has no socket). Rootless VMs
    # publish on their own loopback address by default, so they contend only for an explicit one.
    first, second = secrets.token_hex(6), secrets.token_hex(6)
    port = free_port()
    host = "" if mode == "bridged" else "127.0.0.1:"
    setup_network(mode, store=store, journal=Journal(store, first), vm_id=first,
                  ports=[parse_publish(f"{host}{port}:80")])
    try:
        before = host_state()
        with pytest.raises(FcvmError, match=f"host port {port}/tcp is already in use"):
            setup_network(mode, store=store, journal=Journal(store, second), vm_id=second,
                          ports=[parse_publish(f"{host}{port}:8080")])
        assert_nothing_held(store, second)
        assert_host_restored(before)
    finally:
        teardown_network(Journal(store, first))


def test_bridged_port_published_from_another_state_store_is_detected(tmp_path: Path) -> None:
    """Two fcvm installations (separate data dirs) share one host: the FCVM chains are the tie-breaker."""
    store = Store()
    other = Store(tmp_path / "other" / "state.db")
    first, second = secrets.token_hex(6), secrets.token_hex(6)
    port = free_port()
    setup_network("bridged", store=other, journal=Journal(other, first), vm_id=first,
                  ports=[parse_publish(f"{port}:80")])
    try:
        with pytest.raises(FcvmError, match="another fcvm VM publishes it"):
            setup_network("bridged", store=store, journal=Journal(store, second), vm_id=second,
                          ports=[parse_publish(f"{port}:80")])
        assert_nothing_held(store, second)
    finally:
        teardown_network(Journal(other, first))


def test_two_bridged_vms_share_the_hooks_and_the_last_one_restores_the_host() -> None:
    before = host_state()
    store = Store()
    a, b = secrets.token_hex(6), secrets.token_hex(6)
    setup_network("bridged", store=store, journal=Journal(store, a), vm_id=a, ports=[])
    setup_network("bridged", store=store, journal=Journal(store, b), vm_id=b, ports=[])
    teardown_network(Journal(store, a))
    # b still needs forwarding and the hooks.
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    assert "-A POSTROUTING -j FCVM-POSTROUTING" in _run(["iptables-save", "-t", "nat"])
    teardown_network(Journal(store, b))
    assert_host_restored(before)


def test_unknown_mode_is_a_usage_error() -> None:
    store = Store()
    with pytest.raises(FcvmError, match="unknown network mode") as info:
        setup_network("host", store=store, journal=Journal(store, "x"), vm_id="x", ports=[])
    assert info.value.exit_code == 2


def test_guest_side_is_identical_in_every_vm() -> None:
    store = Store()
    a, b = secrets.token_hex(6), secrets.token_hex(6)
    nets = [setup_network(m, store=store, journal=Journal(store, i), vm_id=i, ports=[])
            for m, i in (("bridged", a), ("rootless", b))]
    try:
        for net in nets:
            assert net.guest_spec()["address"] == network.GUEST_IP
            assert net.guest_spec()["mac"] == network.GUEST_MAC
            out = _run([*net.enter_argv(), "ip", "-4", "-o", "addr", "show", "dev", network.TAP_NAME])
            assert f"{network.GATEWAY_IP}/{network.GUEST_PREFIX}" in out
    finally:
        for i in (a, b):
            teardown_network(Journal(store, i))


_UNPRIVILEGED = r"""
import json, subprocess, sys
from fcvm.network import default_mode, parse_publish, setup_network, teardown_network
from fcvm.state.journal import Journal
from fcvm.state.store import Store

port, guest_code, vm_id = int(sys.argv[1]), sys.argv[2], "0123456789ab"
store = Store()
journal = Journal(store, vm_id)
net = setup_network(default_mode(), store=store, journal=journal, vm_id=vm_id, ports=[parse_publish(f"{port}:80")])
guest = subprocess.Popen([*net.enter_argv(), sys.executable, "-c", guest_code,
                          json.dumps({**net.guest_spec(), "tap": net.tap})],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
try:
    assert guest.stdout.readline().strip() == "ready"
    with net.connect(80) as conn:
        line = conn.makefile().readline().strip()
finally:
    guest.kill()
    guest.wait()
failures = teardown_network(journal)
print(json.dumps({"mode": net.mode, "loopback": net.loopback, "line": line, "failures": failures,
                  "allocations": store.allocations(vm_id), "journal": len(journal.entries())}))
"""


def test_rootless_works_for_an_unprivileged_user() -> None:
    """The whole rootless path as uid 65534: namespace, slirp4netns, TAP, a published port, teardown."""
    import shutil
    import tempfile

    import pyroute2

    import fcvm

    nobody = 65534
    data = Path(tempfile.mkdtemp(prefix="fcvm-nobody-"))
    os.chown(data, nobody, nobody)
    # Where this interpreter is not usable by others (e.g. under a 0700 /root), point these at one that is.
    python = os.environ.get("FCVM_TEST_NOBODY_PYTHON", sys.executable)
    pythonpath = os.environ.get("FCVM_TEST_NOBODY_PYTHONPATH", "").split(os.pathsep)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(data), "FCVM_DATA_DIR": str(data),
        "PYTHONPATH": os.pathsep.join([*filter(None, pythonpath),
                                       *(str(Path(m.__file__).parent.parent) for m in (fcvm, pyroute2))]),
    }

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody)
        os.setuid(nobody)

    def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, *argv], env=env, preexec_fn=drop, capture_output=True, text=True,
                              cwd=data, timeout=60)

    try:
        try:
            preflight = as_nobody("-c", "import os, fcvm.network, pyroute2; os.open('/dev/net/tun', os.O_RDWR)")
        except PermissionError as exc:
            preflight = subprocess.CompletedProcess([python], 1, "", f"cannot run {python}: {exc}")
        reason = (preflight.stderr.strip().splitlines() or ["?"])[-1]
        # e.g. /dev/net/tun is 0600 here, or the interpreter lives under a 0700 /root (.ci/run provides both).
        require(preflight.returncode == 0, f"uid {nobody} cannot run fcvm's rootless path on this machine: {reason}")
        result = as_nobody("-c", _UNPRIVILEGED, str(free_port()), _GUEST)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["mode"] == "rootless"
        assert report["line"] == "guest tcp 80 from 10.0.2.2"
        assert report["failures"] == [] and report["allocations"] == {} and report["journal"] == 0
    finally:
        store = Store(data / "state.db")
        for owner in store.journal_owners():
            teardown_network(Journal(store, owner))
        store.close()
        shutil.rmtree(data, ignore_errors=True)
