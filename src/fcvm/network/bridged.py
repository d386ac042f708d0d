"""`--network bridged` (root): one netns per VM, joined to the host by a veth pair on a per-VM /30.

    host: fc<key>h 172.30.N.1/30  <-veth->  netns fcvm-<key>: uplink0 172.30.N.2/30, tap0 172.31.0.1/30
                                                               guest (behind tap0): 172.31.0.2/30

Host iptables (FCVM-* chains): published ports are DNATed to 172.30.N.2 in PREROUTING (other hosts, other
VMs) and OUTPUT (this host, including 127.0.0.1: route_localnet on the veth plus a MASQUERADE so replies come
back); the /30 is masqueraded on the way out. Inside the netns the published guest ports on 172.30.N.2 are
DNATed to the guest and the guest's traffic is masqueraded as 172.30.N.2.

The namespace end of the veth has a fixed MAC, which the host knows from the start (a permanent neighbour entry):
a connection to a published port that comes before the namespace's uplink is up must not leave the host waiting
for an ARP answer, which it would ask again only after 1 s.

What a VM may reach: the world (through NAT), DNS, and published ports on the host's addresses, as any
outside client would. Not the host (FCVM-INPUT rejects new connections from the veth, except DNS to the
nameservers the guest was given and, with --allow-host-loopback, the host's loopback), and not another VM
(FCVM-ISOLATION lets into a veth only replies and connections DNATed to a published port). Only the VM's own
address leaves its veth; anything else is dropped, on the host and already in the namespace.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import threading
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from fcvm.core import log
from fcvm.core.errors import UsageError
from fcvm.network import base
from fcvm.network import iptables as ipt
from fcvm.network.ports import PortMapping
from fcvm.state.journal import Journal
from fcvm.state.store import Store

_log = log.get("network")

POOL_ENV = "FCVM_BRIDGED_POOL"
DEFAULT_POOL = "172.30.0.0/16"


def _pool() -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(os.environ.get(POOL_ENV, DEFAULT_POOL))


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Networks already in use on the host (addresses and routes), so a /30 never shadows one."""
    used = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            used.append(ipaddress.IPv4Network(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}", strict=False))
        for msg in ipr.get_routes(family=2, table=254):
            dst = msg.get_attr("RTA_DST")
            if dst and msg["dst_len"] > 0:
                used.append(ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False))
    return used


def _subnet_candidates() -> Iterator[str]:
    used = _host_networks()
    for net in _pool().subnets(new_prefix=30):
        if not any(net.overlaps(u) for u in used):
            yield str(net)


def _host_rules(net: base.VmNetwork) -> list[tuple[str, str, list[str]]]:
    tag = ipt.comment(net.vm_id)
    rules: list[tuple[str, str, list[str]]] = []
    ns_ip, veth = net.ns_side_ip, net.host_if
    for m in net.ports:
        every_address = not m.host_ip or m.host_ip == "0.0.0.0"
        match = ["-m", "addrtype", "--dst-type", "LOCAL"] if every_address else ["-d", m.host_ip]
        dnat = [*match, "-p", m.protocol, "-m", m.protocol, "--dport", str(m.host_port), *tag,
                "-j", "DNAT", "--to-destination", f"{ns_ip}:{m.guest_port}"]
        if not ipaddress.IPv4Address(m.host_ip or "0.0.0.0").is_loopback:
            rules.append(("nat", "FCVM-PREROUTING", dnat))
        rules.append(("nat", "FCVM-OUTPUT", dnat))
    if net.host_loopback:
        # The namespace sends what the guest addresses to its gateway here; route_localnet lets it reach 127.0.0.1.
        for protocol in ("tcp", "udp"):
            rules.append(("nat", "FCVM-PREROUTING", ["-i", veth, "-d", net.host_side_ip, "-p", protocol, *tag,
                                                     "-j", "DNAT", "--to-destination", "127.0.0.1"]))
    rules += [
        # Connections from this host's 127.0.0.1 to a published port: give them a source the netns can answer.
        ("nat", "FCVM-POSTROUTING", ["-s", "127.0.0.0/8", "-o", veth, *tag, "-j", "MASQUERADE"]),
        # The VM's egress.
        ("nat", "FCVM-POSTROUTING", ["-s", net.subnet, "!", "-o", veth, *tag, "-j", "MASQUERADE"]),
    ]
    # To the host: only the VM's own address, only answers and what it was given (DNS; the loopback if asked).
    rules.append(("filter", "FCVM-INPUT", ["-i", veth, "!", "-s", ns_ip, *tag, "-j", "DROP"]))
    rules.append(("filter", "FCVM-INPUT", ["-i", veth, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                                           *tag, "-j", "RETURN"]))
    for server in net.dns:
        for protocol in ("udp", "tcp"):
            rules.append(("filter", "FCVM-INPUT", ["-i", veth, "-d", server, "-p", protocol, "-m", protocol,
                                                   "--dport", "53", *tag, "-j", "RETURN"]))
    if net.host_loopback:
        rules.append(("filter", "FCVM-INPUT", ["-i", veth, "-d", "127.0.0.1", *tag, "-j", "RETURN"]))
    rules.append(("filter", "FCVM-INPUT", ["-i", veth, *tag, *ipt.REJECT]))
    # Through the host: only the VM's own address leaves the veth; only answers and published ports enter it.
    rules.append(("filter", "FCVM-ISOLATION", ["-i", veth, "!", "-s", ns_ip, *tag, "-j", "DROP"]))
    rules.append(("filter", "FCVM-ISOLATION", ["-o", veth, "-m", "conntrack", "!", "--ctstate",
                                               "DNAT,ESTABLISHED,RELATED", *tag, *ipt.REJECT]))
    # After the host's FORWARD rules: accept the VM's own traffic and nothing more.
    rules.append(("filter", "FCVM-ACCEPT", ["-i", veth, "-s", ns_ip, *tag, "-j", "ACCEPT"]))
    rules.append(("filter", "FCVM-ACCEPT", ["-o", veth, "-d", ns_ip, "-m", "conntrack", "--ctstate",
                                             "ESTABLISHED,RELATED", *tag, "-j", "ACCEPT"]))
    for protocol, guest_port in base.published_guest_ports(net.ports):
        rules.append(("filter", "FCVM-ACCEPT", ["-o", veth, "-d", ns_ip, "-p", protocol, "-m", protocol,
                                                 "--dport", str(guest_port), "-m", "conntrack", "--ctstate",
                                                 "DNAT", *tag, "-j", "ACCEPT"]))
    return rules


def setup(*, store: Store, journal: Journal, vm_id: str, ports: list[PortMapping],
          tap_uid: int | None = None, host_loopback: bool = False) -> base.VmNetwork:
    """Build it all, journaling each resource before creating it. On failure the caller undoes the journal."""
    if os.geteuid() != 0:
        raise UsageError("--network bridged needs root", hint="run as root, or use --network rootless")
    for tool in ("iptables", "iptables-restore", "iptables-save", "nsenter"):
        base.tool(tool)
    net = base.VmNetwork(mode="bridged", vm_id=vm_id, ports=list(ports), netns=base.netns_name(vm_id),
                         host_if=base.host_ifname(vm_id), dns=base.host_dns(), host_loopback=host_loopback)
    with ipt.host_lock():
        ruleset = ipt.Ruleset.read()
        dnat = {p: ruleset.published_ports(p) for p in ("tcp", "udp")}
        base.check_ports(store, vm_id, ports, default_addr="0.0.0.0",
                         published_elsewhere=lambda m: m.host_port in dnat[m.protocol])
        net.subnet = store.allocate("subnet", vm_id, _subnet_candidates())
        ipt.acquire_host(journal, vm_id, ruleset)

        journal.record("netns", name=net.netns)
        pr_netns.create(net.netns)
        journal.record("link", ifname=net.host_if)
        with IPRoute() as ipr:
            ipr.link("add", ifname=net.host_if, kind="veth",
                     peer={"ifname": base.UPLINK_NAME, "address": base.UPLINK_MAC, "net_ns_fd": net.netns})
            index = ipr.link_lookup(ifname=net.host_if)[0]
            ipr.addr("add", index=index, address=net.host_side_ip, prefixlen=30)
            ipr.neigh("add", dst=net.ns_side_ip, lladdr=base.UPLINK_MAC, ifindex=index, state=base.NUD_PERMANENT)
            ipt.write_sysctl(f"net.ipv4.conf.{net.host_if}.route_localnet", "1")
            ipr.link("set", index=index, state="up")
        ipt.add_rules(journal, _host_rules(net))

    base.configure_inside(net, {
        "uplink": base.UPLINK_NAME, "uplink_addr": f"{net.ns_side_ip}/30", "uplink_ip": net.ns_side_ip,
        "uplink_gateway": net.host_side_ip, "tap_uid": tap_uid,
        "published": base.published_guest_ports(net.ports), "host_loopback": net.host_side_ip if host_loopback else "",
    })
    return net


def configure_in_netns(netns: str, config: dict[str, Any]) -> None:
    """fcvm.network.inside's configuration of the namespace, from a thread of this process that enters it: a
    network namespace belongs to a thread, and the commands it runs inherit it. (Another interpreter under
    nsenter cost ~0.2 s.) The thread ends inside; no other code ever runs in the namespace."""
    from fcvm.network import inside

    failure: list[BaseException] = []

    def configure() -> None:
        try:
            pr_netns.setns(netns, flags=0)
            inside.configure(config)
        except BaseException as exc:  # handed to the caller, whatever it is
            failure.append(exc)

    thread = threading.Thread(target=configure, name=f"configure-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


# --- undo handlers ------------------------------------------------------------------------------------


def undo_netns(data: dict[str, object]) -> None:
    name = str(data["name"])
    if name in pr_netns.listnetns():
        with contextlib.suppress(FileNotFoundError):
            pr_netns.remove(name)


def undo_link(data: dict[str, object]) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=str(data["ifname"]))
        if found:
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
