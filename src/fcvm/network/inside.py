"""Configures a VM's network namespace from the inside: `configure(config)` in a thread that entered a root-owned
netns, or `python -m fcvm.network.inside CONFIG_JSON` under VmNetwork.enter_argv() for a user+net namespace.

Creates the TAP with the gateway address, brings up the uplink (the veth peer or slirp4netns' tap), enables
forwarding, and NATs: the published guest ports on the uplink address go to GUEST_IP, and the guest's traffic
leaves masqueraded as the uplink address. Only GUEST_IP may send through the namespace (the guest cannot
spoof), and nothing but answers and published ports reaches the guest. With `host_loopback` the guest's TCP
and UDP to its gateway address go to that address (whence the host's 127.0.0.1). Nothing here is journaled:
it all dies with the namespace.

The guest's MAC is fixed, so the namespace knows it from the start (a permanent neighbour entry): a connection
that arrives while the guest is not yet running waits in the TAP's queue, not for an ARP answer that would be
asked again only after 1 s. The TAP's MAC is fixed too: a clone's guest answers through the gateway its
snapshot's neighbour cache knows, and never needs to learn it again.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from fcvm.core.errors import FcvmError
from fcvm.network import base
from fcvm.network import iptables as ipt


def _link(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise FcvmError(f"no link {name!r} in the VM's network namespace")
    return int(found[0])


def configure(config: dict[str, Any]) -> None:
    uplink = config["uplink"]
    with IPRoute() as ipr:
        ipr.link("set", index=_link(ipr, "lo"), state="up")
        up = _link(ipr, uplink)
        if config.get("uplink_addr"):
            addr, prefix = config["uplink_addr"].split("/")
            ipr.addr("add", index=up, address=addr, prefixlen=int(prefix))
            ipr.link("set", index=up, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=config["uplink_gateway"], oif=up)
        ipr.link("add", ifname=base.TAP_NAME, kind="tuntap", mode="tap",
                 **({"uid": config["tap_uid"]} if config.get("tap_uid") is not None else {}))
        tap = _link(ipr, base.TAP_NAME)
        ipr.link("set", index=tap, address=base.GATEWAY_MAC)
        ipr.addr("add", index=tap, address=base.GATEWAY_IP, prefixlen=base.GUEST_PREFIX)
        ipr.link("set", index=tap, state="up")
        ipr.neigh("add", dst=base.GUEST_IP, lladdr=base.GUEST_MAC, ifindex=tap, state=base.NUD_PERMANENT)
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    # The guest speaks IPv4 only: no IPv6, not even link-local, between it and the namespace.
    with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
        Path(f"/proc/sys/net/ipv6/conf/{base.TAP_NAME}/disable_ipv6").write_text("1\n")
    ipt.restore(_rules(config))


def _rules(config: dict[str, Any]) -> list[ipt.Rule]:
    uplink, tap = config["uplink"], base.TAP_NAME
    rules: list[ipt.Rule] = []
    for protocol, port in config["published"]:
        rules.append(("nat", "PREROUTING", ["-i", uplink, "-d", config["uplink_ip"], "-p", protocol, "-m", protocol,
                                            "--dport", str(port), "-j", "DNAT", "--to-destination", base.GUEST_IP]))
    if config.get("host_loopback"):
        for protocol in ("tcp", "udp"):
            rules.append(("nat", "PREROUTING", ["-i", tap, "-d", base.GATEWAY_IP, "-p", protocol,
                                                "-j", "DNAT", "--to-destination", config["host_loopback"]]))
    rules += [
        ("nat", "POSTROUTING", ["-s", base.GUEST_NET, "-o", uplink, "-j", "MASQUERADE"]),
        ("filter", "INPUT", ["-i", tap, "!", "-s", base.GUEST_IP, "-j", "DROP"]),
        ("filter", "FORWARD", ["-i", tap, "!", "-s", base.GUEST_IP, "-j", "DROP"]),
        ("filter", "FORWARD", ["-o", tap, "-m", "conntrack", "!", "--ctstate", "DNAT,ESTABLISHED,RELATED",
                               "-j", "DROP"]),
    ]
    if config.get("block_new_to"):
        # The guest may answer connections from there (published ports) but not open any (host loopback).
        rules.append(("filter", "FORWARD", ["-i", tap, "-d", config["block_new_to"],
                                            "-m", "conntrack", "--ctstate", "NEW", "-j", "REJECT"]))
    return rules


def main() -> None:
    configure(json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
