"""Configures a VM's network namespace from the inside: `python -m fcvm.network.inside CONFIG_JSON`,
launched through VmNetwork.enter_argv(), so it works the same in a root netns and in a user+net namespace.

Creates the TAP with the gateway address, brings up the uplink (the veth peer or slirp4netns' tap), enables
forwarding, and NATs: everything arriving for the uplink address goes to GUEST_IP, and the guest's traffic
leaves masqueraded as the uplink address. Nothing here is journaled: it all dies with the namespace.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from fcvm.core import proc
from fcvm.network import base


def _link(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise SystemExit(f"fcvm.network.inside: no link {name!r} in this namespace")
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
        ipr.addr("add", index=tap, address=base.GATEWAY_IP, prefixlen=base.GUEST_PREFIX)
        ipr.link("set", index=tap, state="up")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    rules = [
        ["-t", "nat", "-A", "PREROUTING", "-i", uplink, "-d", config["uplink_ip"],
         "-j", "DNAT", "--to-destination", base.GUEST_IP],
        ["-t", "nat", "-A", "POSTROUTING", "-s", base.GUEST_NET, "-o", uplink, "-j", "MASQUERADE"],
    ]
    if config.get("block_new_to"):
        # The guest may answer connections from there (published ports) but not open any (host loopback).
        rules.append(["-t", "filter", "-A", "FORWARD", "-i", base.TAP_NAME, "-d", config["block_new_to"],
                      "-m", "conntrack", "--ctstate", "NEW", "-j", "REJECT"])
    iptables = base.tool("iptables")
    for rule in rules:
        proc.run([iptables, "-w", "10", *rule], timeout=30)


def main() -> None:
    configure(json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
