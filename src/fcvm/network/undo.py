"""Undo handlers for network resources. Each is idempotent and tolerates a resource that never came to be.

Kinds: "netns" {name}, "link" {ifname}, "iptables" {table, chain, rule} (host namespace), "net_host" {vm_id}
(the shared FCVM-* chains and ip_forward, restored by the last VM). The rootless holder and slirp4netns are
core "process" entries, its API socket a core "socket" entry (both tagged layer="network").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _netns(data: dict[str, Any]) -> None:
    from fcvm.network import bridged

    bridged.undo_netns(data)


def _link(data: dict[str, Any]) -> None:
    from fcvm.network import bridged

    bridged.undo_link(data)


def _iptables(data: dict[str, Any]) -> None:
    from fcvm.network import iptables

    iptables.delete_rule(data["table"], data["chain"], data["rule"])


def _net_host(data: dict[str, Any]) -> None:
    from fcvm.network import iptables

    iptables.release_host(data["vm_id"])


HANDLERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "netns": _netns,
    "link": _link,
    "iptables": _iptables,
    "net_host": _net_host,
}
