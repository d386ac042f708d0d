"""What both network modes share: the fixed in-namespace addresses, names, the VmNetwork result and helpers."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcvm.core import log
from fcvm.core.errors import FcvmError, UsageError
from fcvm.core.proc import ProcessRef
from fcvm.network.ports import PortMapping
from fcvm.state.journal import Journal
from fcvm.state.store import Store

_log = log.get("network")

# Inside its namespace every VM sees the same addresses, so a snapshot restored as a clone keeps working.
GUEST_IP = "172.31.0.2"
GATEWAY_IP = "172.31.0.1"
GUEST_PREFIX = 30
GUEST_NET = "172.31.0.0/30"
GUEST_MAC = "06:00:ac:1f:00:02"  # locally administered, unicast
# The TAP's (the guest's gateway's) MAC: a clone's guest finds its gateway where its snapshot's neighbour cache says.
GATEWAY_MAC = "06:00:ac:1f:00:01"
TAP_NAME = "tap0"
# The namespace end of the uplink: the veth peer (bridged) or slirp4netns' tap (rootless).
UPLINK_NAME = "uplink0"
UPLINK_MAC = "06:00:ac:1e:00:02"  # the veth peer's, in every VM: the host knows it before the namespace is up
NUD_PERMANENT = 0x80  # a neighbour entry that is never resolved again (linux/neighbour.h)
IFNAMSIZ = 15  # usable characters

NETNS_DIR = Path("/run/netns")
# Host-global runtime state (lock, shared chains/sysctl bookkeeping). /run is cleared on reboot, and so
# are the iptables rules and sysctls it describes.
RUN_DIR = Path(os.environ.get("FCVM_NET_RUN_DIR", "/run/fcvm"))


def vm_key(vm_id: str) -> str:
    """12 characters derived from the VM id, safe in interface names: the id itself when it is short hex."""
    if re.fullmatch(r"[0-9a-f]{12}", vm_id):
        return vm_id
    return hashlib.sha256(vm_id.encode()).hexdigest()[:12]


def netns_name(vm_id: str) -> str:
    return f"fcvm-{vm_key(vm_id)}"


def host_ifname(vm_id: str) -> str:
    name = f"fc{vm_key(vm_id)}h"
    assert len(name) <= IFNAMSIZ
    return name


@dataclass
class VmNetwork:
    """A VM's network as set up; stored as JSON in the VM row's `network` column."""

    mode: str
    vm_id: str
    tap: str = TAP_NAME
    ports: list[PortMapping] = field(default_factory=list)
    # --allow-host-loopback: the guest reaches the host's 127.0.0.1 at its gateway address (GATEWAY_IP)
    host_loopback: bool = False
    # bridged
    netns: str = ""
    host_if: str = ""
    subnet: str = ""  # the veth /30; host end .1, namespace end .2
    # rootless
    holder_pid: int = 0
    holder_start: int = 0
    loopback: str = ""
    api_socket: str = ""
    dns: list[str] = field(default_factory=list)

    # --- how to reach it ---------------------------------------------------------------------------

    @property
    def host_side_ip(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet)[1]) if self.subnet else ""

    @property
    def ns_side_ip(self) -> str:
        """The namespace's uplink address; its published guest ports are forwarded to the guest."""
        if self.mode == "bridged":
            return str(ipaddress.IPv4Network(self.subnet)[2])
        return SLIRP_NS_IP

    def enter_argv(self) -> list[str]:
        """argv prefix that runs a command inside the VM's namespaces (the VMM is launched with it)."""
        if self.mode == "bridged":
            return ["nsenter", f"--net={NETNS_DIR / self.netns}"]
        proc = f"/proc/{self.holder_pid}/ns"
        return ["nsenter", "--preserve-credentials", f"--user={proc}/user", f"--net={proc}/net"]

    def published(self) -> list[tuple[str, int, PortMapping]]:
        """(address, port, mapping): where a client on this host connects for each mapping."""
        result = []
        for m in self.ports:
            if m.host_ip and m.host_ip != "0.0.0.0":
                addr = m.host_ip
            else:
                addr = "127.0.0.1" if self.mode == "bridged" or m.host_ip else self.loopback
            result.append((addr, m.host_port, m))
        return result

    def connect(self, guest_port: int, *, protocol: str = "tcp", timeout: float = 5.0) -> socket.socket:
        """A socket connected to the guest's `guest_port` through its published host port."""
        for addr, port, m in self.published():
            if m.guest_port == guest_port and m.protocol == protocol:
                kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
                sock = socket.socket(socket.AF_INET, kind)
                sock.settimeout(timeout)
                try:
                    sock.connect((addr, port))
                except BaseException:
                    sock.close()
                    raise
                return sock
        raise FcvmError(f"guest port {guest_port}/{protocol} is not published", hint=f"add -p HOSTPORT:{guest_port}")

    def guest_spec(self) -> dict[str, Any]:
        """The guest side, for the plan's NetworkSpec."""
        return {"address": GUEST_IP, "prefix": GUEST_PREFIX, "gateway": GATEWAY_IP, "mac": GUEST_MAC,
                "dns": list(self.dns)}

    def holder(self) -> ProcessRef | None:
        return ProcessRef(self.holder_pid, self.holder_start) if self.holder_pid else None

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "vm_id": self.vm_id, "tap": self.tap, "ports": [p.to_json() for p in self.ports],
            "host_loopback": self.host_loopback,
            "netns": self.netns, "host_if": self.host_if, "subnet": self.subnet,
            "holder_pid": self.holder_pid, "holder_start": self.holder_start, "loopback": self.loopback,
            "api_socket": self.api_socket, "dns": list(self.dns),
            "guest": self.guest_spec(),
            "published": [[a, p, str(m)] for a, p, m in self.published()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmNetwork:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "ports"}
        return cls(**known, ports=[PortMapping.from_json(p) for p in data.get("ports", [])])


SLIRP_NS_IP = "10.0.2.100"  # slirp4netns --configure defaults
SLIRP_GATEWAY = "10.0.2.2"
SLIRP_DNS = "10.0.2.3"


# --- helpers ------------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """Path of an external tool; also looks in the sbin directories a non-root user's PATH often lacks."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if found is None:
        raise FcvmError(f"{name} is not installed", hint="run `fcvm doctor` to see what is missing")
    return found


def host_dns() -> list[str]:
    """Non-loopback nameservers from the host's resolv.conf (a guest cannot reach the host's 127.x)."""
    servers = []
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    addr = ipaddress.ip_address(parts[1])
                except ValueError:
                    continue
                if addr.version == 4 and not addr.is_loopback:
                    servers.append(str(addr))
    return servers[:3]


def check_bindable(addr: str, port: int, protocol: str) -> OSError | None:
    """None if nothing on this host holds addr:port (a listening TCP socket or a bound UDP socket)."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        if protocol == "tcp":
            # Ignore TIME_WAIT leftovers; a socket in LISTEN still conflicts.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return exc
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return exc
            raise
    return None


def port_in_use_error(m: PortMapping, detail: str) -> FcvmError:
    return FcvmError(
        f"host port {m.host_port}/{m.protocol} is already in use ({detail})",
        hint=f"choose another host port, e.g. -p {m.host_port + 1}:{m.guest_port}"
        + ("" if m.protocol == "tcp" else "/udp") + ", or stop whatever holds it",
    )


def check_ports(store: Store, vm_id: str, ports: Sequence[PortMapping], *, default_addr: str,
                published_elsewhere: Callable[[PortMapping], bool] = lambda _m: False) -> None:
    """Fail before creating anything if a host port is taken; claims the ports in the store.

    `default_addr` is where a mapping without a host address listens: every address (bridged) or the VM's own
    loopback address (rootless)."""
    for m in ports:
        addr = m.host_ip or default_addr
        holder = store.claim_port(vm_id, m.protocol, "*" if addr == "0.0.0.0" else addr, m.host_port)
        if holder is not None:
            raise port_in_use_error(m, f"VM {holder} publishes it")
        if published_elsewhere(m):
            raise port_in_use_error(m, "another fcvm VM publishes it")
        problem = check_bindable(addr, m.host_port, m.protocol)
        if problem is None:
            continue
        if problem.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"cannot publish on {addr}: it is not an address of this host", hint=f"fix -p {m}")
        if problem.errno == errno.EACCES:
            raise FcvmError(f"host port {m.host_port} is privileged and this user may not bind it",
                            hint="use a host port >= 1024 or lower net.ipv4.ip_unprivileged_port_start")
        raise port_in_use_error(m, "a process on this host listens on it")


def published_guest_ports(ports: Sequence[PortMapping]) -> list[tuple[str, int]]:
    """(protocol, guest port) of each mapping, each once: what the namespace forwards to the guest."""
    return list(dict.fromkeys((m.protocol, m.guest_port) for m in ports))


NETWORK_ALLOCATION_KINDS = ("port", "subnet", "loopback")


def release_network_allocations(store: Store, vm_id: str) -> None:
    store.release_allocations(vm_id, NETWORK_ALLOCATION_KINDS)


def spawn_journaled(journal: Journal, argv: Sequence[str], *, what: str, pass_fds: Sequence[int] = (),
                    stdout: int | None = None, stderr: int | None = None) -> ProcessRef:
    """Start a long-lived helper and journal it (kind "process") with no window in which it could leak.

    The helper first waits for a line on stdin: it only execs `argv` after its pid and start time are in the
    journal, and exits by itself if we die before that (EOF).
    """
    shell = ["/bin/sh", "-c", 'read -r _ || exit 111; exec "$@"', "fcvm-" + what, *argv]
    child = subprocess.Popen(
        shell, stdin=subprocess.PIPE, stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=stderr if stderr is not None else subprocess.DEVNULL, pass_fds=tuple(pass_fds),
        start_new_session=True, close_fds=True,
    )
    assert child.stdin is not None
    try:
        ref = ProcessRef.of(child.pid)
        journal.record("process", pid=ref.pid, start=ref.start, grace=2, layer="network", what=what)
    except BaseException:
        child.kill()
        child.wait()
        raise
    child.stdin.write(b"go\n")
    child.stdin.close()
    # Reap it whenever it exits (the journal owns it; this only avoids a zombie in a long-lived parent).
    threading.Thread(target=child.wait, name=f"reap-{what}", daemon=True).start()
    return ref


def wait_readable(fd: int, timeout: float, what: str) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        raise FcvmError(f"{what} did not become ready within {timeout:.0f} s")
    return os.read(fd, 64)


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise FcvmError(f"timed out waiting for {what}")
        time.sleep(interval)


def configure_inside(net: VmNetwork, config: dict[str, Any]) -> None:
    """Configure the VM's namespace from the inside (fcvm.network.inside). In a root-owned network namespace
    a thread of ours enters it; a user namespace takes a process of its own (a threaded process cannot join one),
    run under enter_argv()."""
    if net.mode == "bridged":
        from fcvm.network import bridged

        bridged.configure_in_netns(net.netns, config)
        return
    import json

    from fcvm.core import proc

    proc.run([*net.enter_argv(), sys.executable, "-m", "fcvm.network.inside", json.dumps(config)], timeout=60)
