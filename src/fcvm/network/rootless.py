"""`--network rootless`: a user+net namespace owned by a holder process, slirp4netns for egress and port
forwarding, no privileges needed.

    host: slirp4netns, listening on 127.X.Y.Z:HOSTPORT (a loopback address allocated per VM)
      |   forwards to 10.0.2.100:GUESTPORT
    user+net ns (holder: unshare ... sleep): uplink0 10.0.2.100/24 (slirp4netns' tap), tap0 172.31.0.1/30
                                             guest (behind tap0): 172.31.0.2/30

Inside the namespace the published guest ports on 10.0.2.100 are DNATed to the guest and the guest's traffic
is masqueraded as 10.0.2.100, so slirp4netns carries it out. slirp4netns maps 10.0.2.2 to the host's loopback;
the namespace lets the guest open connections there only with --allow-host-loopback (podman's
`slirp4netns:allow_host_loopback=true`), and then at its gateway address too, as in bridged mode.
slirp4netns runs as podman runs it: sandboxed (own mount namespace, no capabilities) under seccomp.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fcvm.core import log, paths
from fcvm.core.errors import FcvmError
from fcvm.network import base
from fcvm.network.ports import PortMapping
from fcvm.state.journal import Journal
from fcvm.state.store import Store

_log = log.get("network")

TOOLS = ("unshare", "nsenter", "slirp4netns", "sleep")


def loopback_candidates() -> Iterator[str]:
    """127.A.B.C with A derived from the uid, so two users' fcvm state stores rarely pick the same address."""
    first = 100 + os.getuid() % 100
    for b in range(256):
        for c in range(2, 255):
            yield f"127.{first}.{b}.{c}"


def slirp_api(path: str, execute: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One request on the slirp4netns API socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(json.dumps({"execute": execute, "arguments": arguments}).encode())
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    if "error" in reply:
        raise FcvmError(f"slirp4netns {execute} failed: {reply['error'].get('desc', reply['error'])}")
    return reply


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _check_unprivileged_ports(ports: list[PortMapping]) -> None:
    """slirp4netns holds no privilege on the host, even when root starts it: it binds what any user may bind."""
    first = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    for m in ports:
        if m.host_port < first:
            raise FcvmError(f"host port {m.host_port} is privileged and --network rootless cannot publish it",
                            hint=f"use a host port >= {first}, lower net.ipv4.ip_unprivileged_port_start, "
                            "or use --network bridged (root)")


def setup(*, store: Store, journal: Journal, vm_id: str, ports: list[PortMapping],
          host_loopback: bool = False) -> base.VmNetwork:
    for tool in TOOLS:
        base.tool(tool)
    net = base.VmNetwork(mode="rootless", vm_id=vm_id, ports=list(ports), dns=[base.SLIRP_DNS],
                         host_loopback=host_loopback)
    net.loopback = store.allocate("loopback", vm_id, loopback_candidates())
    _check_unprivileged_ports(ports)
    base.check_ports(store, vm_id, ports, default_addr=net.loopback)

    # The holder owns the namespaces; it lives until the journal's undo terminates it.
    holder = base.spawn_journaled(
        journal, ["unshare", "--user", "--map-root-user", "--net", "--", "sleep", "infinity"], what="netns"
    )
    net.holder_pid, net.holder_start = holder.pid, holder.start
    base.wait_for(lambda: _comm(holder.pid) == "sleep" or not holder.alive(), 10, "the namespace holder")
    if not holder.alive():
        raise FcvmError("could not create a user and network namespace",
                        hint="check that unprivileged user namespaces are enabled (sysctl user.max_user_namespaces)")

    run = paths.ensure_dir(paths.vm_dir(vm_id))
    net.api_socket = str(run / "slirp.sock")
    journal.record("socket", path=net.api_socket, layer="network")
    ready_r, ready_w = os.pipe()
    try:
        base.spawn_journaled(
            journal,
            # In the VM's user namespace, where slirp4netns puts its sandbox by itself unless it runs as root:
            # the sandbox's mount namespace is then owned by that user namespace and its mounts come in as
            # slaves. Left in the host's by real root, its pivot_root unmounts every /run/netns/* on the host.
            ["nsenter", "--preserve-credentials", f"--user=/proc/{holder.pid}/ns/user", "--",
             # Not --disable-host-loopback: with it, UDP replies to host clients on 127.x are dropped (podman
             # #4586). The namespace blocks new guest connections to the host's loopback instead.
             "slirp4netns", "--configure", "--mtu=65520", "--enable-sandbox", "--enable-seccomp",
             f"--api-socket={net.api_socket}", f"--ready-fd={ready_w}", str(holder.pid), base.UPLINK_NAME],
            what="slirp4netns", pass_fds=[ready_w],
        )
        os.close(ready_w)
        ready_w = -1
        if base.wait_readable(ready_r, 15, "slirp4netns") != b"1":
            raise FcvmError("slirp4netns exited before the network was configured",
                            hint="run `fcvm doctor`; /dev/net/tun must be usable by this user")
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)

    base.configure_inside(net, {
        "uplink": base.UPLINK_NAME, "uplink_ip": base.SLIRP_NS_IP,
        "published": base.published_guest_ports(ports),
        **({"host_loopback": base.SLIRP_GATEWAY} if host_loopback else {"block_new_to": base.SLIRP_GATEWAY}),
    })
    for m in ports:
        try:
            slirp_api(net.api_socket, "add_hostfwd", {
                "proto": m.protocol, "host_addr": m.host_ip or net.loopback, "host_port": m.host_port,
                "guest_addr": base.SLIRP_NS_IP, "guest_port": m.guest_port,
            })
        except FcvmError as exc:
            raise base.port_in_use_error(m, str(exc)) from exc
    return net
